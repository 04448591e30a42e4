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
