"""`samsuite unlearn ...`: prepare the embedded benchmark's models, unlearn, relearn, evaluate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

unlearn_app = typer.Typer(no_args_is_help=True, help="LLM unlearning with SAM-family smoothing, and the relearning attack.")

NPROC_HELP = ("processes to run on this machine (one GPU each on CUDA), as torchrun --nproc_per_node would start them; "
              "the numbers are those of one process")


def _launched(nproc: int, device: str, check: Callable[[Any], None]) -> None:
    """With --nproc K > 1: check the command for K processes, start them and exit with their code."""
    if nproc == 1:
        return
    import click

    from unlearn.distributed import World
    from unlearn.launch import check_nproc, launch, without_nproc

    check_nproc(nproc, device)
    check(World(0, nproc))
    given = click.get_current_context().find_root().obj or {}  # set by experiments.cli.main
    if "argv" not in given:
        raise RuntimeError("--nproc: run through the samsuite command line (experiments.cli.main)")
    raise typer.Exit(launch(without_nproc(given["argv"]), nproc, given["debug"]))


@unlearn_app.command("prepare")
def prepare_command(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value: training (epochs=5) or tiny.<field>"),
    scale: str = typer.Option("tiny", help="tiny (a small Llama from scratch) | smollm2 (SmolLM2-135M fine-tuned)"),
    out: Path = typer.Option(Path("runs/toy-models"), help="folder for target/, retrain/ and prepare.json"),
    seed: int = typer.Option(0, help="the benchmark's and the training's seed"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch CPU threads (1: fastest for the tiny model)"),
    force: bool = typer.Option(False, help="train again even if prepare.json matches these settings"),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Build the embedded benchmark's "target" (forget + retain) and "retrain" (retain only) models."""
    from unlearn.distributed import processes
    from unlearn.prepare import check_settings, prepare

    _launched(nproc, device, lambda w: check_settings(scale, seed, overrides or [], out, w))
    with processes(device) as w:
        record = prepare(out, scale=scale, seed=seed, overrides=overrides or [], device=device, threads=threads,
                         force=force)
    if w.main:
        typer.echo(json.dumps(record["models"], indent=2))
        typer.echo(f"models in {out}/target and {out}/retrain; figures in {out}/prepare.json")


def _key_values(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option}: expected key=path, got {item!r}")
        out[key] = value
    return out


@unlearn_app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="model folder, .gguf file, 'smollm2', hub id, or peft adapter folder"),
    benchmark: str = typer.Option(..., help="toy, wmdp, muse-news, muse-books (or a saved benchmark folder)"),
    output: Optional[Path] = typer.Option(None, help="JSON file (default: runs/eval-<name>/eval.json and stdout)"),
    backend: str = typer.Option("ours", help="ours | lm-eval (multiple choice through lm-evaluation-harness)"),
    max_samples: Optional[int] = typer.Option(None, help="first N rows of every evaluated split"),
    retrain: Optional[str] = typer.Option(None, help="the retrained model: its privleak AUC makes PrivLeak"),
    paths: Optional[list[str]] = typer.Option(None, help="key=path: a local copy of a benchmark table (repeat)"),
    cache_dir: Optional[Path] = typer.Option(None, help="datasets cache folder"),
    subset: Optional[list[str]] = typer.Option(None, help="WMDP subset (repeat): wmdp-bio, wmdp-cyber, wmdp-chem"),
    metric: Optional[list[str]] = typer.Option(None, help="metric (repeat; default: all the benchmark has)"),
    batch_size: int = typer.Option(16),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    adapter: Optional[str] = typer.Option(None, help="peft adapter folder applied to --model"),
    gguf_file: Optional[str] = typer.Option(None, help=".gguf file name inside the --model folder"),
    trust_remote_code: bool = typer.Option(False, help="run the model repository's own code (off by default)"),
    seed: int = typer.Option(0, help="the toy benchmark's seed"),
    name: Optional[str] = typer.Option(None, help="run name: runs/eval-<name>/ (default: <model>-<benchmark>)"),
    out_dir: Path = typer.Option(Path("runs"), help="folder of run folders"),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Evaluate a model: WMDP-style multiple choice (as lm-eval computes it) and MUSE's VerbMem, KnowMem, PrivLeak."""
    from shared.runio import check_out_dir, check_run_name, write_json
    from shared.validate import check_device
    from unlearn.distributed import claim_on_main, processes
    from unlearn.eval import ModelSpec, check_backend, evaluate_model
    from unlearn.models import check_model_spec

    check_device("device", device)
    check_model_spec(model, "model", gguf_file)
    if retrain:
        check_model_spec(retrain, "retrain")
    spec = ModelSpec(model, dtype, device, gguf_file, adapter, trust_remote_code)
    run_name = f"eval-{name or Path(model.rstrip('/')).stem + '-' + Path(benchmark.rstrip('/')).name}"
    if output is None:
        check_run_name(run_name, "name")
        check_out_dir(out_dir)
    else:
        check_out_dir(output.parent, "output")
    _launched(nproc, device, lambda w: check_backend(backend, w))

    def evaluate() -> dict[str, Any]:
        return evaluate_model(
            spec, benchmark, backend=backend, metrics=metric, max_samples=max_samples, batch_size=batch_size,
            retrain=ModelSpec(retrain, dtype, device, trust_remote_code=trust_remote_code) if retrain else None,
            paths=_key_values(paths, "paths"), cache_dir=str(cache_dir) if cache_dir else None,
            subsets=subset, seed=seed,
        )

    with processes(device) as w:
        if output is not None:
            record = evaluate()
            if w.main:
                write_json(output, record)
        else:
            with claim_on_main(out_dir, run_name, "eval", w) as run:
                record = evaluate()
                output = run.write_json("eval.json", record) if w.main else None
            if w.main:
                typer.echo(json.dumps(record, indent=2, default=str))
    if w.main:
        typer.secho(f"metrics written to {output}", err=True)


@unlearn_app.command("run", context_settings={"allow_extra_args": False})
def run_command(
    args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]"),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Prepare -> evaluate -> unlearn -> evaluate -> relearn -> evaluate, for every method x seed (default:
    NPO vs NPO+SAM on the embedded benchmark, tiny model); results under runs/<name>/, resumable.
    Configs: experiments/configs/unlearn/*.yaml; any field as key=value (unlearn.lr=0.0001, seeds=[0,1,2]).
    Several processes: --nproc K, or torchrun --nproc_per_node K $(which samsuite) unlearn run ..."""
    from experiments.cli import split_args
    from unlearn.distributed import processes
    from unlearn.pipeline import check_pipeline, load_run_config, run_pipeline

    cfg = load_run_config(*split_args(args))
    _launched(nproc, cfg.device, lambda w: check_pipeline(cfg, w))
    with processes(cfg.device) as w:
        run_pipeline(cfg)
    if w.main:
        run_dir = Path(cfg.out_dir) / cfg.name
        typer.echo((run_dir / "results.md").read_text())
        typer.echo(f"summary.json, metrics.jsonl, bars.png and relearn_curves.png in {run_dir}")


@unlearn_app.command("relearn", context_settings={"allow_extra_args": False})
def relearn_command(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value: RelearnConfig fields (n_samples=20 steps=30)"),
    model: str = typer.Option(..., help="the unlearned model: folder, .gguf file, hub id or peft adapter folder"),
    benchmark: str = typer.Option("toy", help="toy, wmdp, muse-news, muse-books (or a saved benchmark folder)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default: runs/relearn-<model folder name>)"),
    paths: Optional[list[str]] = typer.Option(None, help="key=path: a local copy of a benchmark table (repeat)"),
    subset: Optional[list[str]] = typer.Option(None, help="WMDP subset (repeat): wmdp-bio, wmdp-cyber, wmdp-chem"),
    max_samples: Optional[int] = typer.Option(None, help="first N rows of every evaluated split"),
    batch_size: int = typer.Option(16, help="evaluation batch size"),
    dtype: str = typer.Option("float32", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    seed: int = typer.Option(0, help="the toy benchmark's seed"),
    threads: Optional[int] = typer.Option(1, min=1, help="torch threads (1: fastest for small models on a busy CPU)"),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """The relearning attack: fine-tune MODEL on N forget samples (several seeded draws) and follow the forget
    metrics; writes relearn.json (curve: mean ± std over draws) and relearn_curves.png."""
    from shared.config import ConfigError, apply_overrides, from_dict
    from shared.threads import torch_threads
    from shared.validate import check_device
    from unlearn.benchmarks import load_benchmark
    from unlearn.distributed import check_split, check_world, claim_on_main, processes
    from unlearn.eval import available_metrics
    from unlearn.models import check_model_spec, load_model
    from unlearn.plots import relearn_curves
    from unlearn.relearn import RelearnConfig, benchmark_eval_fn, curve_metrics, draw_samples, relearn

    out = out or Path("runs") / f"relearn-{Path(model.rstrip('/')).name}"
    cfg = from_dict(RelearnConfig, apply_overrides({}, overrides or []))
    check_device("device", device)
    check_model_spec(model, "model")
    bench = load_benchmark(benchmark, paths=_key_values(paths, "paths"), subsets=subset, seed=seed)
    metrics = curve_metrics(bench, cfg.metrics, available_metrics(bench))
    forget = list(bench.corpora["forget"]["text"])
    try:
        draw_samples(len(forget), cfg.n_samples, cfg.seed, 0)
    except ConfigError as err:
        raise ConfigError(f"{err} (relearn's n_samples=)") from None

    def check(w: Any) -> None:
        check_world(cfg.train_config(0), w)
        check_split("n_samples", cfg.n_samples or len(forget), w)

    _launched(nproc, device, check)
    with processes(device) as w, claim_on_main(out.parent, out.name, "relearn", w), torch_threads(threads):
        lm, tokenizer = load_model(model, dtype=dtype, device=device)
        eval_fn = benchmark_eval_fn(tokenizer, bench, metrics, max_samples=max_samples, batch_size=batch_size)
        result = relearn(lm, tokenizer, forget, cfg, eval_fn=eval_fn, run_dir=out)
        if w.main:
            relearn_curves(out / "relearn_curves.png", {Path(model.rstrip("/")).name: result["curve"]}, {}, metrics,
                           f"Relearning attack on {model}: {cfg.n_samples or 'all'} forget samples, {cfg.draws} draws")
    if w.main:
        typer.echo(json.dumps(result["curve"], indent=2))
        typer.echo(f"relearn.json, relearn_curves.png and one folder per draw in {out}")


@unlearn_app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="run folders of `samsuite unlearn run` (runs/<name>)"),
    out: Path = typer.Option(Path("runs/unlearn-compare"), help="folder for compare.csv and compare.md"),
    title: Optional[str] = typer.Option(None, help="title of the table"),
) -> None:
    """Tabulate runs: metrics after unlearning (forget acc., utility ...) and forget metrics after relearning,
    mean ± std over seeds."""
    from unlearn.pipeline import compare_runs

    compare_runs(runs, out, title=title)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"compare.csv in {out}")
