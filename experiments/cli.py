"""The `samsuite` command line: `train`, `fed ...`, `unlearn ...`, `seg ...` and `bench ...`.

Exit codes: 0 success; 2 bad input (a config value, file or run folder refused before any work);
1 a failure at run time (a diverged run, a full disk, an unexpected error); 130 interrupted.
Expected errors print one line, `error: ...`, naming the field or file and what to change, and no
traceback; `samsuite --debug ...` or SAMSUITE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import click
import typer

from experiments.cli_fed import fed_app
from experiments.cli_seg import seg_app
from experiments.cli_unlearn import unlearn_app
from shared.errors import ConfigError, RunError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="samsuite: the SAM family for FL and LLM unlearning.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")
app.add_typer(bench_app, name="bench")
app.add_typer(fed_app, name="fed")
app.add_typer(unlearn_app, name="unlearn")
app.add_typer(seg_app, name="seg")


def split_args(args: list[str] | None) -> tuple[Path | None, list[str]]:
    """[CONFIG.yaml] [key=value ...] -> (config path or None, overrides)."""
    paths = [a for a in args or [] if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(f"expected at most one config file before the key=value overrides, got {paths}")
    return (Path(paths[0]) if paths else None), [a for a in args or [] if "=" in a]


@app.command(context_settings={"allow_extra_args": False})
def train(args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]")) -> None:
    """Train the digits CNN with SGD, SAM, ASAM, GSAM and OBF; results under runs/<name>/."""
    from experiments.train import TrainConfig, run_train
    from shared.config import load_config

    cfg = load_config(TrainConfig, *split_args(args))
    run_train(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    typer.echo((run_dir / "results.md").read_text())
    typer.echo(f"results, curves.png and summary.json in {run_dir}")


@bench_app.command("optim")
def bench_optim(
    out: Optional[Path] = typer.Option(None, help="folder for optim.json (default: print only)"),
    quick: bool = typer.Option(False, help="a few seconds, for smoke tests"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads (1: the least noisy ratios on a shared CPU)"),
    seed: int = typer.Option(0),
) -> None:
    """Time of one optimizer step (passes included) of each member / the base SGD step."""
    from experiments.bench.optim import run

    run(out_dir=out, quick=quick, seed=seed, threads=threads)  # prints the table and the JSON


@bench_app.command("fed")
def bench_fed(
    out: Optional[Path] = typer.Option(None, help="folder for fed.json and fed.md (default: print only)"),
    quick: bool = typer.Option(False, help="one model, few repeats and rounds, for smoke tests"),
    flower: bool = typer.Option(True, "--flower/--no-flower", help="also time the Flower simulation (Ray start-up)"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads (1: the least noisy ratios on a shared CPU)"),
    seed: int = typer.Option(0),
    deploy: bool = typer.Option(False, "--deploy", help="instead: Flower's Deployment Engine on 127.0.0.1, the "
                                "per-message overhead against a bare script's cold start, rounds against in-process"),
    supernodes: int = typer.Option(1, min=1, help="--deploy: SuperNodes to start"),
) -> None:
    """Stacked gossip mixing vs a per-node loop (N=100), Flower vs in-process rounds, engine overhead,
    the batched engine; with --deploy, the cost of a real local deployment (deploy.json, deploy.md)."""
    if deploy:
        from experiments.bench.deploy import run as run_deploy

        run_deploy(out_dir=out, quick=quick, seed=seed, supernodes=supernodes)  # prints the table
        return
    from experiments.bench.fed import run

    run(out_dir=out, quick=quick, seed=seed, threads=threads, flower=flower)  # prints the tables


@bench_app.command("seg")
def bench_seg(
    out: Optional[Path] = typer.Option(None, help="folder for seg.json and seg.md (default: print only)"),
    quick: bool = typer.Option(False, help="small sizes and few repeats, for smoke tests"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads"),
    seed: int = typer.Option(0),
) -> None:
    """The Mamba selective scan against its sequential reference; UU-Mamba's SAM step against the SGD step."""
    from experiments.bench.seg import run

    run(out_dir=out, quick=quick, seed=seed, threads=threads)  # prints the tables


@bench_app.command("unlearn")
def bench_unlearn(
    out: Optional[Path] = typer.Option(None, help="folder for unlearn.json and unlearn.md (default: print only)"),
    quick: bool = typer.Option(False, help="a tiny model and a few rounds, for smoke tests"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads (1: the least noisy ratios on a shared CPU)"),
    device: str = typer.Option("cpu", help="cpu or cuda (peak memory from torch.cuda there)"),
    seed: int = typer.Option(0),
    nproc: int = typer.Option(1, min=1, help="instead: unlearning on NPROC processes (FSDP2) vs 1, step time and "
                              "peak memory per rank (procs.json, procs.md)"),
) -> None:
    """NPO+SAM / NPO step time and peak memory, and NPO with cached vs recomputed reference log-probs; with
    --nproc K, the same run on K processes against one."""
    from shared.validate import check_device

    check_device("device", device, allow_auto=False)
    if nproc > 1:
        from experiments.bench.unlearn_procs import run as run_procs
        from unlearn.launch import check_nproc

        check_nproc(nproc, device)
        run_procs(out_dir=out, nproc=nproc, quick=quick, seed=seed, threads=threads, device=device)
        return
    from experiments.bench.unlearn import run

    run(out_dir=out, quick=quick, seed=seed, threads=threads, device=device)


@bench_app.command("eval")
def bench_eval(
    out: Optional[Path] = typer.Option(None, help="folder for eval.json (default: print only)"),
    quick: bool = typer.Option(False, help="a tiny random model and a few questions, for smoke tests"),
    model: str = typer.Option("smollm2", help="model spec (see `samsuite unlearn eval --model`)"),
    dtype: str = typer.Option("float32", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads (1: the least noisy ratios on a shared CPU)"),
    seed: int = typer.Option(0),
) -> None:
    """MC questions/s of our scorer vs lm-eval, and greedy tokens/s batched + KV cache vs one at a time."""
    from experiments.bench.eval import run
    from shared.validate import check_device

    check_device("device", device)

    run(out_dir=out, quick=quick, seed=seed, threads=threads, model=model, dtype=dtype, device=device)


def _error(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one of several processes (torchrun, --nproc): rank 0 alone reports
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SAMSUITE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        command = typer.main.get_command(app)
        # the context's obj: the command line as given (`--nproc` starts it again in each process)
        code = command.main(args=argv, prog_name="samsuite", standalone_mode=False, obj={"argv": argv, "debug": debug})
        return code if isinstance(code, int) else 0  # typer.Exit(code), e.g. the processes of --nproc
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:  # usage errors: click's own message (and exit code 2)
        err.show()
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):
        _error("interrupted; the same command resumes the run from its last checkpoint")
        return 130
    except Exception as err:  # noqa: BLE001 - every error ends here as one line (the traceback with --debug)
        if debug:
            traceback.print_exc()
        if isinstance(err, ValueError):  # ConfigError and the domains' input errors
            _error(str(err))
            return 2
        if isinstance(err, (RunError, OSError)):
            _error(str(err))
        elif isinstance(err, MemoryError):
            _error("out of memory; lower batch_size or the model size")
        else:
            _error(f"unexpected {type(err).__name__}: {err} (run again with --debug for the traceback, and "
                   "please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
