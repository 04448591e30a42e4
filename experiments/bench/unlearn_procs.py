"""`samsuite bench unlearn --nproc K`: unlearning on K processes (FSDP2, gloo on CPU, nccl on CUDA)
against one process, as ratios from one run: the step time, the peak memory per rank, the bytes of
the sharded state per rank, and whether the weights are the same.

The run is what users run: `unlearn.train.unlearn` with NPO+SAM (retain term, gamma = 1), full
fine-tuning with AdamW, the same config and seed on 1 and on K processes (each rank takes
batch_size / K rows of every micro-batch), on a Llama sized by the settings below. Every layout
runs twice: once timed (the median of the steps after the first two, from the run's own
metrics.jsonl) and once under the memory profiler, which slows the steps down.

Peak memory per rank: on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before; on
CPU the peak "Total Allocated" of the CPU allocator's events in torch.profiler (`experiments.bench.
unlearn._cpu_peak`), over the whole run (model, optimizer, reference cache, activations). The
sharded state (weights + gradients + AdamW's two moments: 4 weight-sized tensors per rank) falls to
1/K per rank; the activations fall with the rows each rank computes; what stays whole on every
rank is the layer being gathered (FSDP gathers one unit at a time) and the batch of token ids.

Time on a CPU: K processes of `threads` threads each against one process of `threads` threads, on
the same cores; with K x threads above the cores they compete, so the ratio says what K processes
cost on this machine, not what K GPUs would give.
"""

from __future__ import annotations

import json
import pickle
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from rich.table import Table

from experiments.bench import console as bench_console
from experiments.bench.unlearn import _cpu_peak, _model, _tokenizer
from shared.report import markdown_table
from shared.runio import atomic_write_text, environment, write_json
from shared.sam.shards import local
from unlearn.benchmarks import build_toy
from unlearn.train import UnlearnConfig

FULL = {"hidden": 256, "layers": 4, "batch_size": 8, "max_length": 128, "steps": 8, "texts": 32}
QUICK = {"hidden": 32, "layers": 2, "batch_size": 4, "max_length": 32, "steps": 3, "texts": 8}
SKIP = 2  # first steps left out of the median (warm-up: allocations, FSDP's lazy init)


def _config(settings: dict[str, Any]) -> UnlearnConfig:
    return UnlearnConfig(objective="npo", smoother="sam", lr=1e-5, gamma=1.0, beta=0.1, rho=0.01,
                         steps=settings["steps"], batch_size=settings["batch_size"], max_length=settings["max_length"],
                         save_every=0)


def _worker(rank: int, world: int, quick: bool, device: str, threads: int, seed: int, folder: str) -> None:
    """One rank of one layout: the timed run, then the profiled run; rank 0 writes what it measured."""
    import torch.distributed as dist

    from unlearn.distributed import full
    from unlearn.train import unlearn

    torch.set_num_threads(threads)
    if world > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{folder}/init", rank=rank, world_size=world)
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    settings = QUICK if quick else FULL
    tokenizer = _tokenizer(quick)
    toy = build_toy(seed)
    forget, retain = (list(toy.corpora[s]["text"][: settings["texts"]]) for s in ("forget", "retain"))
    cfg = _config(settings)

    def train(run_dir: Path | None) -> Any:
        model = _model(tokenizer, settings["hidden"], settings["layers"], seed).to(dev)
        unlearn(model, tokenizer, forget, retain, cfg, run_dir=run_dir)
        return model

    model = train(Path(folder) / "run")
    state_bytes = 4 * sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    weights = {n: full(p).detach().cpu() for n, p in model.named_parameters()}
    del model
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        train(None)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _cpu_peak(lambda: train(None))
    peaks = [None] * world
    if world > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if rank == 0:
        records = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_time_s"] for r in records if r["kind"] == "train"]
        Path(folder, "out.pkl").write_bytes(pickle.dumps({
            "step_s": statistics.median(steps[SKIP:] or steps), "peaks": peaks, "state_bytes": state_bytes,
            "weights": weights,
        }))
    if world > 1:
        dist.destroy_process_group()


def _layout(world: int, quick: bool, device: str, threads: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="samsuite-bench-procs-") as folder:
        mp.spawn(_worker, args=(world, quick, device, threads, seed, folder), nprocs=world, join=True)
        return pickle.loads(Path(folder, "out.pkl").read_bytes())


def _rows(result: dict[str, Any]) -> list[dict[str, str]]:
    return [{"processes": str(r["processes"]), "median step (s)": f"{r['step_s']:.4f}",
             "step / 1 process": f"{r['time_ratio']:.3f}", "peak memory per rank (MiB)": f"{r['peak_mib']:.1f}",
             "memory / 1 process": f"{r['memory_ratio']:.3f}", "state per rank (MiB)": f"{r['state_mib']:.2f}",
             "state / 1 process": f"{r['state_ratio']:.3f}", "max |w - w(1 process)|": f"{r['max_weight_diff']:.2e}"}
            for r in result["layouts"]]


def _table(result: dict[str, Any]) -> Table:
    rows = _rows(result)
    table = Table(title=f"NPO+SAM on {result['config']['nproc']} processes vs 1 (one run)")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row.values())
    return table


def run(out_dir: Path | None = None, *, nproc: int = 2, quick: bool = False, seed: int = 0, threads: int | None = 1,
        device: str = "cpu") -> dict[str, Any]:
    """Run 1 and `nproc` processes; print a table and the JSON, write procs.json and procs.md to
    `out_dir` if given, and return the result."""
    settings = QUICK if quick else FULL
    if settings["batch_size"] % nproc:
        raise ValueError(f"nproc: the benchmark's batch of {settings['batch_size']} rows cannot be shared evenly "
                         f"by {nproc} processes; use a divisor of it")
    start = time.perf_counter()
    layouts = {k: _layout(k, quick, device, threads or 1, seed) for k in (1, nproc)}
    one = layouts[1]
    rows = []
    for k, got in layouts.items():
        peak = max(got["peaks"])
        rows.append({
            "processes": k, "step_s": got["step_s"], "time_ratio": got["step_s"] / one["step_s"],
            "peak_bytes_per_rank": got["peaks"], "peak_mib": peak / 2**20, "memory_ratio": peak / max(one["peaks"]),
            "state_mib": got["state_bytes"] / 2**20, "state_ratio": got["state_bytes"] / one["state_bytes"],
            "max_weight_diff": max(float((got["weights"][n] - w).abs().max()) for n, w in one["weights"].items()),
        })
    result = {
        "benchmark": "unlearn-procs",
        "config": {"quick": quick, "seed": seed, "nproc": nproc, "threads_per_process": threads or 1, **settings,
                   "run": "NPO+SAM (rho 0.01, gamma 1), AdamW full fine-tuning, float32, FSDP2 per decoder layer",
                   "time_method": f"median step time of the timed run, steps after the first {SKIP}",
                   "memory_method": ("torch.cuda.max_memory_allocated minus the bytes allocated before" if device == "cuda"
                                     else "the peak 'Total Allocated' of the CPU allocator's events in torch.profiler "
                                          "(profile_memory=True), the highest rank"),
                   "state": "weights + gradients + AdamW's two moments of this rank's shards (4 x the shard bytes)"},
        "environment": environment(device),
        "layouts": rows,
        "wall_s": time.perf_counter() - start,
    }
    console = bench_console()
    console.print(_table(result))
    console.print_json(data=result)
    if out_dir is not None:
        write_json(Path(out_dir) / "procs.json", result)
        atomic_write_text(Path(out_dir) / "procs.md", f"**{_table(result).title}**\n\n" + markdown_table(_rows(result))
                          + f"\n{result['config']['memory_method']}; time: {result['config']['time_method']}\n")
    return result
