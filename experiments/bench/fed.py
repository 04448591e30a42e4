"""`samsuite bench fed`: the speed of decentralized FL, as ratios measured in one run.

1. Gossip mixing of N=100 models: `fedsam.mixing.mix_` on the stacked (N, P) tensor against
   `mix_loop`, a per-node, per-tensor Python loop as P2P nodes would mix (target: >= 10x), on a
   ring (Q=1 and the MGS Q=4), the exponential graph and the full graph, for the digits CNN and
   the CIFAR-10 CNN. Next to it, the time of copying X once (`copy`): no mixing can read and write
   X faster, so loop / copy is the most any mixing could gain here; sparse graphs on a model in
   main memory are bound by it.
2. The same 20-node rounds on the in-process engine and on the Flower simulation (Ray): the ratio
   of their round times, and Flower's overhead per message (the round-time difference / the 20
   round trips). Flower runs one ClientApp at a time (one actor gets all CPUs) so both engines do
   the same compute one node after the other; both must give the same metrics.
3. The in-process engine's round time / the summed compute of its nodes' local updates (target:
   <= 1.15): what the engine adds (tasks, stacking, mixing, consensus distance, logging). Measured
   on rounds without evaluation or checkpoint (eval_every = checkpoint_every = rounds); the last
   round, which evaluates, is reported beside it.
4. The batched engine (`engine=batched`, `fedsam.batched`) against the sequential one, round time
   at N = 10, 20, 100 on the digits CNN and the MNIST-1D CNN, on the default DFedSAM run (Dirichlet
   0.3, one local epoch, so the nodes' step counts differ and passes mask some steps): both at one
   torch thread, and the batched engine also at every core (the sequential engine's small kernels
   gain nothing from more threads; measured slower). Target: >= 2.5x at N = 100 on the MNIST-1D CNN
   at one thread. Where the time goes: the share of example slots that the passes pad or mask
   (nodes with less data or fewer steps than their pass's largest), the time per node-step, and
   the share of one batched round (N = 100, MNIST-1D) spent in convolution kernels (profiler).
   On a CUDA machine the grid is repeated on the GPU.

Timing: mixing contenders run round-robin (order rotated each round) after a warm-up call, so that
drift of a shared machine hits all alike; a time is the median. Engine rounds skip the first
(warm-up, and Ray's actor start-up for Flower) and the last (evaluation); a round ratio is the
median over the rounds of the per-round ratio.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from experiments.bench import console as bench_console
from experiments.bench import round_robin
from fedsam.config import FedConfig
from fedsam.mixing import auto_method, flatten_states, mix_, mix_loop, mixing_power, unflatten
from fedsam.models import build_model
from fedsam.topology import build_topology, metropolis_hastings
from shared.report import markdown_table
from shared.runio import RunDir, atomic_write_text, environment, write_json
from shared.threads import torch_threads

MIX_NODES = 100
MIX_GRAPHS = (("ring", 1), ("ring", 4), ("exponential", 1), ("full", 1))  # (topology, Q)
#: (label, model, num_classes, input shape)
MIX_MODELS = (("digits CNN", "cnn", 10, (1, 8, 8)), ("CIFAR-10 CNN", "cnn", 10, (3, 32, 32)))
ENGINE_NODES = 20
MIX_TARGET = 10.0  # stacked mixing at least this many times faster than the loop
OVERHEAD_TARGET = 1.15  # in-process round time / summed local compute at most this
TIMING = ("compute_s", "round_s", "time_s")

#: (label, dataset, model) of part 4
BATCHED_MODELS = (("digits CNN", "digits", "cnn"), ("MNIST-1D CNN", "mnist1d", "cnn1d"))
BATCHED_TARGET = 2.5  # batched / sequential round time at N = 100 on the MNIST-1D CNN, one CPU thread
BATCHED_RTOL = 2e-4  # the engines' metrics agree to this (tests/fedsam/test_batched.py says why it is not 0)
BATCHED_ACC_ATOL = 0.005  # and accuracies to this: a couple of test examples at a near-tie (1/450 each on digits)

FULL = {"mix_models": 2, "mix_repeats": 7, "engine_rounds": 8, "batched_models": 2, "batched_nodes": (10, 20, 100),
        "batched_rounds": 5}
QUICK = {"mix_models": 1, "mix_repeats": 3, "engine_rounds": 4, "batched_models": 1, "batched_nodes": (10,),
         "batched_rounds": 3}


# ---------------------------------------------------------------------------------------------- 1. mixing
def bench_mixing(label: str, model: str, num_classes: int, input_shape: tuple[int, ...], repeats: int, seed: int
                 ) -> list[dict[str, Any]]:
    """One row per (topology, Q): stacked vs loop vs copy on N=100 perturbed copies of the model."""
    torch.manual_seed(seed)
    state = build_model(model, num_classes, input_shape).state_dict()
    base, spec = flatten_states([state])
    noise = torch.randn(MIX_NODES, spec.numel, generator=torch.Generator().manual_seed(seed))
    X = base.expand(MIX_NODES, -1) + 0.01 * noise
    states = [list(unflatten(X[i], spec, copy=True).values()) for i in range(MIX_NODES)]  # type: ignore[union-attr]
    out, floor = torch.empty_like(X), torch.empty_like(X)
    rows = []
    for topology, q in MIX_GRAPHS:
        W = metropolis_hastings(build_topology(topology, MIX_NODES, seed))
        last: dict[str, list[list[torch.Tensor]]] = {}
        times = round_robin({
            "stacked": functools.partial(mix_, X, W, q, out=out),
            "loop": lambda W=W, q=q, last=last: last.update(loop=mix_loop(states, W, q)),
            "copy": functools.partial(floor.copy_, X),
        }, repeats)[0]
        looped = torch.stack([torch.cat([t.reshape(-1) for t in node]) for node in last["loop"]])
        rows.append({
            "model": label, "parameters": spec.numel, "tensors": len(spec.shapes), "topology": topology, "q": q,
            "method": auto_method(mixing_power(W, q), X.device),
            "stacked_ms": 1e3 * times["stacked"], "loop_ms": 1e3 * times["loop"], "copy_ms": 1e3 * times["copy"],
            "speedup": times["loop"] / times["stacked"], "ceiling": times["loop"] / times["copy"],
            "max_abs_diff": float((out - looped).abs().max()),
        })
    return rows


# ---------------------------------------------------------------------------------------------- 2-3. engines
def _engine_config(out_dir: Path, name: str, rounds: int, seed: int, threads: int) -> FedConfig:
    """20 nodes of the digits demo (IID, so nodes do equal work); evaluation and checkpoint only in
    the last round."""
    return FedConfig(name=name, out_dir=str(out_dir), num_nodes=ENGINE_NODES, partitioner="iid", rounds=rounds,
                     eval_every=rounds, checkpoint_every=rounds, seed=seed, threads=threads, resume=False)


def _records(out_dir: Path, name: str) -> list[dict[str, Any]]:
    return RunDir(out_dir / name).metrics()


def _same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], rtol: float = 1e-6, acc_atol: float = 1e-6
                  ) -> bool:
    """Equal records but for timings: numbers to `rtol`, accuracies to `acc_atol` (a prediction at a
    near-tie may flip under other rounding: one test example is 1/len(test))."""
    def strip(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in TIMING}

    def close(key: str, x: Any, y: Any) -> bool:
        if not isinstance(x, float):
            return x == y
        return bool(np.isclose(x, y, rtol=0, atol=acc_atol) if "acc" in key else np.isclose(x, y, rtol=rtol, atol=1e-6))

    return len(a) == len(b) and all(
        strip(x).keys() == strip(y).keys() and all(close(k, x[k], y[k]) for k in strip(x)) for x, y in zip(a, b))


def bench_engines(rounds: int, seed: int, threads: int, flower: bool) -> dict[str, Any]:
    """Parts 2 and 3 on the same config: per-round times of both engines, from metrics.jsonl."""
    from fedsam.engine import run_inprocess

    with tempfile.TemporaryDirectory(prefix="bench-fed-") as tmp:
        out = Path(tmp)
        run_inprocess(_engine_config(out, "inprocess", rounds, seed, threads), progress=False)
        inproc = _records(out, "inprocess")
        steady = inproc[1:-1]  # not the warm-up round, not the evaluating last round
        engine = {
            "nodes": ENGINE_NODES, "rounds": rounds, "measured_rounds": [r["round"] for r in steady],
            "inprocess_round_s": statistics.median(r["round_s"] for r in steady),
            "inprocess_compute_s": statistics.median(r["compute_s"] for r in steady),
            "overhead_ratio": statistics.median(r["round_s"] / r["compute_s"] for r in steady),
            "overhead_ratio_eval_round": inproc[-1]["round_s"] / inproc[-1]["compute_s"],
        }
        if flower:
            from fedsam.server_app import run_flower

            t0 = time.perf_counter()
            run_flower(_engine_config(out, "flower", rounds, seed, threads), progress=False,
                       cpus_per_client=float(os.cpu_count() or 1))
            wall = time.perf_counter() - t0
            fl = _records(out, "flower")
            fl_steady = fl[1:-1]
            flower_round = statistics.median(r["round_s"] for r in fl_steady)
            engine.update({
                "flower_round_s": flower_round,
                "flower_compute_s": statistics.median(r["compute_s"] for r in fl_steady),
                "flower_over_inprocess": statistics.median(
                    a["round_s"] / b["round_s"] for a, b in zip(fl_steady, steady)),
                "flower_overhead_per_message_ms": 1e3 * (flower_round - engine["inprocess_round_s"]) / ENGINE_NODES,
                "flower_first_round_s": fl[0]["round_s"],
                "flower_outside_rounds_s": wall - fl[-1]["time_s"],
                "same_metrics": _same_metrics(inproc, fl),
            })
    return engine


# ---------------------------------------------------------------------------------------------- 4. batched
def _batched_config(out_dir: Path, name: str, dataset: str, model: str, nodes: int, rounds: int, seed: int,
                    **kw: Any) -> FedConfig:
    """The default DFedSAM run on `nodes` nodes; evaluation and checkpoint only in the last round."""
    return FedConfig(name=name, out_dir=str(out_dir), dataset=dataset, model=model, num_nodes=nodes, rounds=rounds,
                     eval_every=rounds, checkpoint_every=rounds, seed=seed, resume=False, **kw)


def _steady(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return records[1:-1]  # not the warm-up round, not the evaluating last round


def bench_batched(models: tuple[tuple[str, str, str], ...], nodes: tuple[int, ...], rounds: int, seed: int,
                  device: str) -> list[dict[str, Any]]:
    """One row per (model, N) on `device`: see `_batched_row`."""
    with tempfile.TemporaryDirectory(prefix="bench-fed-batched-") as tmp:
        return [_batched_row(Path(tmp), label, dataset, model, n, rounds, seed, device)
                for label, dataset, model in models for n in nodes]


def _batched_row(out: Path, label: str, dataset: str, model: str, n: int, rounds: int, seed: int, device: str
                 ) -> dict[str, Any]:
    """Sequential and batched round times from metrics.jsonl, their ratio (median of per-round
    ratios), the batched engine at every core, and the example slots its passes pad or mask."""
    from fedsam.batched import STEP_OVERHEAD, auto_node_chunk, batch_sizes, chunk_plan
    from fedsam.client import federated_data, node_model
    from fedsam.engine import run_batched, run_inprocess

    def cfg(name: str, **kw: Any) -> FedConfig:
        return _batched_config(out, name, dataset, model, n, rounds, seed, device=device, **kw)

    run_inprocess(cfg("seq", threads=1), progress=False)
    run_batched(cfg("bat", engine="batched", threads=1), progress=False)
    seq, bat = _records(out, "seq"), _records(out, "bat")
    row: dict[str, Any] = {
        "model": label, "dataset": dataset, "nodes": n, "device": device,
        "sequential_round_s": statistics.median(r["round_s"] for r in _steady(seq)),
        "batched_round_s": statistics.median(r["round_s"] for r in _steady(bat)),
        "speedup": statistics.median(a["round_s"] / b["round_s"] for a, b in zip(_steady(seq), _steady(bat))),
        "same_metrics": _same_metrics(seq, bat, rtol=BATCHED_RTOL, acc_atol=BATCHED_ACC_ATOL),
    }
    cores = os.cpu_count() or 1
    if device == "cpu" and cores > 1:
        run_batched(cfg("all", engine="batched", threads=cores), progress=False)
        every = _steady(_records(out, "all"))
        row.update(all_cores=cores, batched_all_cores_round_s=statistics.median(r["round_s"] for r in every),
                   speedup_all_cores=statistics.median(a["round_s"] / b["round_s"] for a, b in zip(_steady(seq), every)))
    config = cfg("plan", engine="batched")
    data = federated_data(config)
    sizes = {}
    for i, node in enumerate(data.nodes):
        count = len(node.train_y)
        sizes[i] = batch_sizes(count, config.batch_size, config.local_step_count(count))
    chunk = auto_node_chunk(config, node_model(config, data), data.input_shape, n)
    passes = chunk_plan(sizes, chunk, mask=True, overhead=STEP_OVERHEAD.get(device.split(":")[0], 1.0))
    slots = 0  # example slots the passes compute: each step of a pass pads every node to its largest batch
    for members in passes:
        longest = max(len(sizes[i]) for i in members)
        slots += len(members) * sum(max(sizes[i][k] if k < len(sizes[i]) else 0 for i in members)
                                    for k in range(longest))
    node_steps = sum(map(len, sizes.values()))
    row.update(node_steps=node_steps, passes=len(passes), node_chunk=chunk,
               padded_share=1 - sum(map(sum, sizes.values())) / slots,
               sequential_ms_per_node_step=1e3 * row["sequential_round_s"] / node_steps,
               batched_ms_per_node_step=1e3 * row["batched_round_s"] / node_steps)
    return row


def conv_share(dataset: str, model: str, nodes: int, seed: int) -> float:
    """The share of one batched round's self CPU time spent in convolution kernels (forward and
    backward), from torch.profiler; the rest is the other kernels and Python."""
    from torch.profiler import profile

    from fedsam.batched import BatchedTrainer
    from fedsam.run import FedRun

    with tempfile.TemporaryDirectory(prefix="bench-fed-profile-") as tmp:
        cfg = _batched_config(Path(tmp), "profile", dataset, model, nodes, 2, seed, engine="batched", threads=1)
        with FedRun(cfg, progress=False) as run:
            trainer = BatchedTrainer(cfg, run.data, run.spec)
            tasks = run.round_tasks(0)
            trainer.round(0, tasks)  # warm-up
            with profile() as prof:
                trainer.round(0, tasks)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / total


# ---------------------------------------------------------------------------------------------- report
def _targets(mixing: list[dict[str, Any]], engine: dict[str, Any], batched: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    checks = [{"what": f"mixing speedup, {r['model']}, {r['topology']} Q={r['q']}", "value": r["speedup"],
               "bound": f">= {MIX_TARGET:g}", "met": r["speedup"] >= MIX_TARGET} for r in mixing]
    checks.append({"what": "in-process round / summed local compute", "value": engine["overhead_ratio"],
                   "bound": f"<= {OVERHEAD_TARGET:g}", "met": engine["overhead_ratio"] <= OVERHEAD_TARGET})
    if "same_metrics" in engine:
        checks.append({"what": "Flower and in-process give the same metrics", "value": engine["same_metrics"],
                       "bound": "true", "met": engine["same_metrics"]})
    for r in batched:
        if r["nodes"] == 100 and r["dataset"] == "mnist1d" and r["device"] == "cpu":
            checks.append({"what": "batched / sequential round, MNIST-1D CNN, N=100, one thread", "value": r["speedup"],
                           "bound": f">= {BATCHED_TARGET:g}", "met": r["speedup"] >= BATCHED_TARGET})
    checks.append({"what": "batched and sequential give the same metrics", "value": all(r["same_metrics"] for r in batched),
                   "bound": f"true (rtol {BATCHED_RTOL:g}, accuracies {BATCHED_ACC_ATOL:g})",
                   "met": all(r["same_metrics"] for r in batched)})
    return checks


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report: the mixing table, the engine table, the targets."""
    mix_rows = [{
        "model (params)": f"{r['model']} ({r['parameters']:,})", "graph": f"{r['topology']} Q={r['q']}",
        "method": r["method"], "stacked ms": f"{r['stacked_ms']:.2f}", "loop ms": f"{r['loop_ms']:.1f}",
        "copy ms": f"{r['copy_ms']:.2f}", "speedup": f"{r['speedup']:.1f}x",
        "ceiling (loop/copy)": f"{r['ceiling']:.1f}x",
    } for r in result["mixing"]]
    e = result["engine"]
    engine_rows = [
        {"measure": "in-process round (s)", "value": f"{e['inprocess_round_s']:.3f}"},
        {"measure": "summed local compute per round (s)", "value": f"{e['inprocess_compute_s']:.3f}"},
        {"measure": "in-process round / summed local compute", "value": f"{e['overhead_ratio']:.3f}"},
        {"measure": "... in the round that evaluates", "value": f"{e['overhead_ratio_eval_round']:.3f}"},
    ]
    if "flower_round_s" in e:
        engine_rows += [
            {"measure": "Flower round (s)", "value": f"{e['flower_round_s']:.3f}"},
            {"measure": "Flower round / in-process round", "value": f"{e['flower_over_inprocess']:.2f}"},
            {"measure": "Flower overhead per message (ms)", "value": f"{e['flower_overhead_per_message_ms']:.1f}"},
            {"measure": "Flower first round (s, with actor start-up)", "value": f"{e['flower_first_round_s']:.2f}"},
            {"measure": "Flower time outside rounds (s, Ray start/stop)",
             "value": f"{e['flower_outside_rounds_s']:.1f}"},
            {"measure": "same metrics on both engines", "value": str(e["same_metrics"])},
        ]
    batched_rows = [{
        "model": r["model"], "device": r["device"], "N": r["nodes"], "sequential s": f"{r['sequential_round_s']:.3f}",
        "batched s": f"{r['batched_round_s']:.3f}", "speedup": f"{r['speedup']:.2f}x",
        **({f"batched, {r['all_cores']} threads": f"{r['batched_all_cores_round_s']:.3f} s "
            f"({r['speedup_all_cores']:.2f}x)"} if "all_cores" in r else {}),
        "ms per node-step (seq / batched)": f"{r['sequential_ms_per_node_step']:.2f} / "
                                            f"{r['batched_ms_per_node_step']:.2f}",
        "passes (node_chunk)": f"{r['passes']} ({r['node_chunk']})", "padded": f"{100 * r['padded_share']:.0f}%",
        "same metrics": str(r["same_metrics"]),
    } for r in result["batched"]]
    target_rows = [{"target": t["what"], "value": t["value"] if isinstance(t["value"], bool) else f"{t['value']:.3g}",
                    "bound": t["bound"], "met": "yes" if t["met"] else "**no**"} for t in result["targets"]]
    cfg = result["config"]
    return (
        f"### Gossip mixing of N={MIX_NODES} models: stacked `mix_` vs per-node, per-tensor loop\n\n"
        + markdown_table(mix_rows)
        + f"\n### Engines: the same {ENGINE_NODES}-node rounds"
        + f" (rounds {e['measured_rounds']} of {e['rounds']}, median)\n\n"
        + markdown_table(engine_rows)
        + "\n### Batched engine: round time against the sequential engine (default DFedSAM run, median)\n\n"
        + markdown_table(batched_rows)
        + (f"\nOne batched round of the MNIST-1D CNN at N=100 spends {100 * result['conv_share']:.0f}% of its CPU "
           "time in convolution kernels (profiler).\n" if result.get("conv_share") is not None else "")
        + "\n### Targets\n\n" + markdown_table(target_rows)
        + f"\ntorch threads {cfg['threads']}, seed {cfg['seed']}, quick={cfg['quick']},"
        + f" {result['wall_s']:.0f} s in all\n"
    )


def _console_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"Gossip mixing of N={MIX_NODES} models (ms, median)")
    for column in ("model", "graph", "method", "stacked", "loop", "copy", "speedup", "ceiling"):
        table.add_column(column, justify="left" if column in ("model", "graph", "method") else "right")
    for r in result["mixing"]:
        ok = r["speedup"] >= MIX_TARGET
        speedup = f"[{'green' if ok else 'red'}]{r['speedup']:.1f}x[/]"
        table.add_row(r["model"], f"{r['topology']} Q={r['q']}", r["method"], f"{r['stacked_ms']:.2f}",
                      f"{r['loop_ms']:.1f}", f"{r['copy_ms']:.2f}", speedup, f"{r['ceiling']:.1f}x")
    return table


def run(out_dir: Path | None = None, *, quick: bool = False, seed: int = 0, threads: int | None = None,
        flower: bool = True) -> dict[str, Any]:
    """Run the four parts, print the tables, write `fed.json` and `fed.md` to `out_dir` if given;
    returns the result. `quick` (one model, few repeats and rounds) is for smoke tests: its ratios
    are too noisy to judge targets by. `flower=False` skips the Flower simulation (Ray start-up)."""
    settings = QUICK if quick else FULL
    start = time.perf_counter()
    with torch_threads(threads):
        used_threads = torch.get_num_threads()
        mixing = [row for spec in MIX_MODELS[: settings["mix_models"]]
                  for row in bench_mixing(*spec, repeats=settings["mix_repeats"], seed=seed)]
        engine = bench_engines(settings["engine_rounds"], seed, threads or 1, flower)
        models = BATCHED_MODELS[: settings["batched_models"]]
        batched = [row for device in ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))
                   for row in bench_batched(models, settings["batched_nodes"], settings["batched_rounds"], seed, device)]
        share = None if quick else conv_share("mnist1d", "cnn1d", 100, seed)
    result = {
        "benchmark": "fed",
        "config": {"quick": quick, "seed": seed, "threads": used_threads, "engine_threads": threads or 1,
                   "flower": flower, "mix_nodes": MIX_NODES, **settings},
        "environment": environment("cpu"),
        "mixing": mixing,
        "engine": engine,
        "batched": batched,
        "conv_share": share,
        "wall_s": time.perf_counter() - start,
    }
    result["targets"] = _targets(mixing, engine, batched)
    result["all_targets_met"] = all(t["met"] for t in result["targets"])
    console = bench_console()
    console.print(_console_table(result))
    console.print(markdown(result))
    if out_dir is not None:
        write_json(Path(out_dir) / "fed.json", result)
        atomic_write_text(Path(out_dir) / "fed.md", markdown(result))
    return result
