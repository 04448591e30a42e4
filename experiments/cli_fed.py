"""`samsuite fed ...`: decentralized FL runs on the in-process engine or Flower, and their comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

fed_app = typer.Typer(no_args_is_help=True, help="Decentralized FL: DFedSAM, DFedSAM-MGS and baselines.")


@fed_app.command("run", context_settings={"allow_extra_args": False})
def run(
    args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Run decentralized FL (default: DFedSAM on digits, 10 nodes, ring, Dirichlet 0.3); results
    under runs/<name>/. Configs: experiments/configs/fed/*.yaml; any field as key=value."""
    from experiments.cli import split_args
    from fedsam.config import FedConfig
    from fedsam.engine import run_fed
    from shared.config import load_config

    cfg = load_config(FedConfig, *split_args(args))
    run_fed(cfg, progress=progress)
    run_dir = Path(cfg.out_dir) / str(cfg.name)
    typer.echo((run_dir / "results.md").read_text())
    typer.echo(f"metrics.jsonl, curves.png and summary.json in {run_dir}")


@fed_app.command("sweep", context_settings={"allow_extra_args": False})
def sweep(
    args: list[str] = typer.Argument(..., help="SWEEP.yaml [key=value ...] (overrides apply to every run)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar per run"),
) -> None:
    """Run a grid of configs (a `sweep:` section, e.g. experiments/configs/fed/digits_sweep.yaml) one
    after the other, each resumable, then compare them: <out_dir>/<sweep name>/compare.{csv,md,png}."""
    from experiments.cli import split_args
    from fedsam.engine import load_sweep, run_sweep
    from shared.config import ConfigError

    path, overrides = split_args(args)
    if path is None:
        raise ConfigError("expected a sweep file (SWEEP.yaml) before the key=value overrides")
    spec = load_sweep(path, overrides)
    run_sweep(spec, progress=progress)
    typer.echo((spec.out / "compare.md").read_text())
    typer.echo(f"runs, compare.csv and compare.png in {spec.out}")


@fed_app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="run folders (runs/<name>)"),
    out: Path = typer.Option(Path("runs/compare"), help="folder for compare.csv, compare.md and compare.png"),
    title: Optional[str] = typer.Option(None, help="title of the table and plot"),
) -> None:
    """Table (final/best test accuracy, personalized accuracy, consensus distance, bytes) and plot across runs."""
    from fedsam.compare import compare_runs

    compare_runs(runs, out, title=title)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"compare.csv and compare.png in {out}")


@fed_app.command("export-partitions", context_settings={"allow_extra_args": False})
def export_partitions(
    args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]"),
    out: Path = typer.Option(..., "--out", help="folder for manifest.json and one node-NNNNN.safetensors per node"),
) -> None:
    """Write a run's split (the in-process engine's, same seed and settings) as one safetensors file
    per node plus manifest.json: copy the manifest and a machine's own node files to it, and name the
    folder in its SuperNode's --node-config partition-dir=... (README, "Deployment")."""
    from experiments.cli import split_args
    from fedsam.config import FedConfig
    from fedsam.partitions import export_partitions as export
    from shared.config import load_config

    cfg = load_config(FedConfig, *split_args(args))
    manifest = export(cfg, out)
    typer.echo(f"{len(manifest['files'])} node partitions of {manifest['dataset']} (split {manifest['split']}) in {out}")


@fed_app.command("deploy", context_settings={"allow_extra_args": False})
def deploy(
    args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]"),
    supernodes: int = typer.Option(2, "--supernodes", help="SuperNodes to start; SuperNode k serves nodes k, k+S, ..."),
    round_timeout: float = typer.Option(3600.0, "--round-timeout", help="seconds a round waits for its replies"),
    node_wait: float = typer.Option(120.0, "--node-wait", help="seconds the relay waits for SuperNodes at the start"),
) -> None:
    """Run on Flower's Deployment Engine on this machine: a SuperLink and SuperNodes on 127.0.0.1
    (private FLWR_HOME, free ports), each SuperNode reading only its own nodes' partitions; every
    process is stopped afterwards, and a failed run exits non-zero. Results under runs/<name>/."""
    from experiments.cli import split_args
    from fedsam.config import FedConfig
    from fedsam.deploy import deploy as run_deployed
    from shared.config import load_config

    cfg = load_config(FedConfig, *split_args(args))
    summary = run_deployed(cfg, supernodes, round_timeout=round_timeout, node_wait=node_wait)
    run_dir = Path(cfg.out_dir) / str(cfg.name)
    typer.echo((run_dir / "results.md").read_text())
    typer.echo(f"deployed run {summary['deployment']['run-id']}: {summary['deployment']['status']}; "
               f"metrics.jsonl, messages.jsonl and summary.json in {run_dir}; logs in "
               f"{Path(cfg.out_dir) / f'.deploy-{cfg.name}'}")
