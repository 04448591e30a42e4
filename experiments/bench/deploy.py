"""`samsuite bench fed --deploy`: what Flower's Deployment Engine costs, measured in one run.

Flower starts a fresh `flwr-clientapp` process for every message, so each message pays a cold start.
1. The floor: the wall time of a bare script (a fresh interpreter) that imports torch and flwr and
   takes one SGD step of the run's model; the first step imports `torch._dynamo`. No ClientApp
   can start faster than this.
2. The per-message overhead of a real local deployment (`fedsam.deploy.LocalDeployment`: a
   SuperLink and SuperNodes on 127.0.0.1, partitions read from files): each reply reports its
   process's age (`process_s`, from process start to the reply) and its own training time
   (`compute_s`). The overhead is process_s minus a warm process's time for the same training
   (the same node's `local_update`, timed in this process after a warm-up). Target: at most 1.5x
   the floor. Beside it, where a cold message's time goes: the ClientApp's imports and the
   partition read, each timed in a fresh interpreter, and the cold process's training time.
3. The deployment's round time against the in-process engine's round on the same config, and
   the round trip of a message as the relay sees it (it adds the SuperNode's polling and the
   SuperLink's hops). All runs must give the same metrics.

Timing: the fresh-interpreter measurements run round-robin (order rotated), 5 times each, median.
Rounds skip the first (the in-process engine's warm-up; the relay's discovery) for the round time.
One SuperNode by default: its messages run one after the other, so the ClientApp processes do
not compete for the two cores with each other.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.bench import console as bench_console
from fedsam.client import federated_data, initial_state, local_update
from fedsam.config import FedConfig
from fedsam.deploy import LocalDeployment
from fedsam.engine import run_inprocess
from fedsam.partitions import split_settings
from shared.report import markdown_table
from shared.runio import atomic_write_text, environment, write_json

OVERHEAD_TARGET = 1.5  # per-message overhead / floor at most this
TIMING = ("compute_s", "round_s", "time_s")
FULL = {"nodes": 10, "rounds": 4, "repeats": 5}
QUICK = {"nodes": 2, "rounds": 2, "repeats": 2}

FLOOR_SCRIPT = """
import time, sys
import torch, flwr
import torch.nn.functional as F
from fedsam.models import build_model
torch.set_num_threads(1)
model = build_model({model!r}, {classes}, {shape})
opt = torch.optim.SGD(model.parameters(), lr=0.05)
F.cross_entropy(model(torch.randn(32, *{shape})), torch.randint(0, {classes}, (32,))).backward()
opt.step()
"""

CLIENT_SCRIPT = """
import json, time
t0 = time.perf_counter()
import fedsam.client_app
from fedsam.config import FedConfig
from fedsam.partitions import load_partitions
t1 = time.perf_counter()
cfg = FedConfig(**json.loads({cfg!r}))
t2 = time.perf_counter()
load_partitions({folder!r}, [0], cfg)
t3 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "config_s": t2 - t1, "read_s": t3 - t2}}))
"""


def _wall(code: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, done.stdout


def fresh_interpreter(cfg: FedConfig, partitions: Path, shape: tuple[int, ...], classes: int, repeats: int
                      ) -> dict[str, Any]:
    """Parts 1 and 2's breakdown: the floor script and the ClientApp's imports + partition read,
    each in a fresh interpreter, round-robin."""
    floor_code = FLOOR_SCRIPT.format(model=cfg.model, classes=classes, shape=tuple(shape))
    client_code = CLIENT_SCRIPT.format(cfg=json.dumps(split_settings(cfg)), folder=str(partitions))
    floors, client = [], []
    for r in range(repeats):
        for which in (("floor", "client") if r % 2 == 0 else ("client", "floor")):
            if which == "floor":
                floors.append(_wall(floor_code)[0])
            else:
                wall, out = _wall(client_code)
                client.append({**json.loads(out), "wall_s": wall})
    return {"floor_s": statistics.median(floors), "floor_runs_s": floors,
            **{f"client_{k}": statistics.median(c[k] for c in client) for k in client[0]}}


def warm_compute(cfg: FedConfig, repeats: int) -> dict[int, float]:
    """Each node's round-0 local update, timed in this (warm) process: median of `repeats` after a warm-up."""
    data = federated_data(cfg)
    state = initial_state(cfg, data)
    out = {}
    local_update(state, 0, 0, cfg, data)  # warm-up: first-step imports, allocator
    for node in range(cfg.num_nodes):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            local_update(state, node, 0, cfg, data)
            times.append(time.perf_counter() - t0)
        out[node] = statistics.median(times)
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    def close(x: Any, y: Any) -> bool:
        return abs(x - y) <= 1e-6 * max(1.0, abs(y)) if isinstance(y, float) else x == y

    return len(a) == len(b) and all(close(x[k], y[k]) for x, y in zip(a, b) for k in y if k not in TIMING)


def run(out_dir: Path | None = None, *, quick: bool = False, seed: int = 0, supernodes: int = 1) -> dict[str, Any]:
    """The three parts on the default `samsuite fed run` config (digits CNN, DFedSAM) with fewer
    nodes and rounds; prints the tables, writes deploy.json and deploy.md to `out_dir` if given."""
    settings = QUICK if quick else FULL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        base = {"num_nodes": settings["nodes"], "rounds": settings["rounds"], "seed": seed, "out_dir": tmp,
                "resume": False, "eval_every": settings["rounds"], "checkpoint_every": settings["rounds"]}
        cfg = FedConfig(engine="flower", name="deployed", **base)  # type: ignore[arg-type]
        run_inprocess(FedConfig(name="inprocess", **base), progress=False)  # type: ignore[arg-type]
        inproc = _records(Path(tmp) / "inprocess" / "metrics.jsonl")
        warm = warm_compute(cfg, settings["repeats"])
        t0 = time.perf_counter()
        with LocalDeployment(cfg, supernodes, round_timeout=600, node_wait=120) as dep:
            summary = dep.run()
            data = federated_data(cfg)
            fresh = fresh_interpreter(cfg, dep.partitions, tuple(data.input_shape), data.num_classes,
                                      settings["repeats"])
        deploy_wall = time.perf_counter() - t0
        deployed = _records(Path(tmp) / "deployed" / "metrics.jsonl")
        messages = _records(Path(tmp) / "deployed" / "messages.jsonl")
    ok = [m for m in messages if m["status"] == "ok"]
    overheads = [m["process_s"] - warm[m["node"]] for m in ok]
    per_message = statistics.median(overheads)
    steady_dep, steady_in = deployed[1:], inproc[1:]
    result = {
        "benchmark": "fed-deploy",
        "config": {"quick": quick, "seed": seed, "supernodes": supernodes, **settings, "model": cfg.model,
                   "dataset": cfg.dataset, "algorithm": cfg.algorithm,
                   "local_work": f"{cfg.local_steps} steps" if cfg.local_steps else f"{cfg.local_epochs or 1} epoch"},
        "environment": environment("cpu"),
        "floor_s": fresh["floor_s"],
        "fresh": fresh,
        "messages": len(messages),
        "failed_messages": len(messages) - len(ok),
        "process_s": statistics.median(m["process_s"] for m in ok),
        "cold_compute_s": statistics.median(m["compute_s"] for m in ok),
        "warm_compute_s": statistics.median(warm.values()),
        "overhead_per_message_s": per_message,
        "overhead_over_floor": per_message / fresh["floor_s"],
        "round_trip_s": statistics.median(m["round_trip_s"] for m in ok),
        "deploy_round_s": statistics.median(r["round_s"] for r in steady_dep),
        "inprocess_round_s": statistics.median(r["round_s"] for r in steady_in),
        "deploy_first_round_s": deployed[0]["round_s"],
        "deploy_wall_s": deploy_wall,
        "same_metrics": _same(deployed, inproc),
        "deployment": summary["deployment"],
    }
    result["round_ratio"] = result["deploy_round_s"] / result["inprocess_round_s"]
    # a SuperNode runs its messages one after another: what a round spends per message beyond the process
    result["dispatch_s"] = result["deploy_round_s"] * supernodes / settings["nodes"] - result["process_s"]
    result["target_met"] = result["overhead_over_floor"] <= OVERHEAD_TARGET
    result["wall_s"] = time.perf_counter() - start
    text = markdown(result)
    bench_console().print(text)
    if out_dir is not None:
        write_json(Path(out_dir) / "deploy.json", result)
        atomic_write_text(Path(out_dir) / "deploy.md", text)
    return result


def markdown(result: dict[str, Any]) -> str:
    f, c = result["fresh"], result["config"]
    rows = [
        {"measure": "floor: fresh interpreter, import torch + flwr, one SGD step (s)", "value": f"{result['floor_s']:.2f}"},
        {"measure": "cold message: ClientApp process age at its reply (s, median)", "value": f"{result['process_s']:.2f}"},
        {"measure": "... of which its training, cold (s)", "value": f"{result['cold_compute_s']:.3f}"},
        {"measure": "warm process, the same training (s)", "value": f"{result['warm_compute_s']:.3f}"},
        {"measure": "**per-message overhead** (cold message - warm training, s)",
         "value": f"{result['overhead_per_message_s']:.2f}"},
        {"measure": f"**overhead / floor** (target <= {OVERHEAD_TARGET})",
         "value": f"{result['overhead_over_floor']:.2f} ({'met' if result['target_met'] else '**missed**'})"},
        {"measure": "fresh interpreter: the ClientApp's imports (s)", "value": f"{f['client_imports_s']:.2f}"},
        {"measure": "fresh interpreter: FedConfig validation (s; builds the optimizer, imports torch._dynamo)",
         "value": f"{f['client_config_s']:.2f}"},
        {"measure": "fresh interpreter: reading one node's partition (s)", "value": f"{f['client_read_s']:.3f}"},
        {"measure": "message round trip seen by the relay (s, median)", "value": f"{result['round_trip_s']:.2f}"},
        {"measure": "Flower's dispatch per message (round x SuperNodes / nodes - process age, s)",
         "value": f"{result['dispatch_s']:.2f}"},
        {"measure": "deployment round (s, median, rounds 2+)", "value": f"{result['deploy_round_s']:.2f}"},
        {"measure": "in-process round, same config (s, median, rounds 2+)", "value": f"{result['inprocess_round_s']:.3f}"},
        {"measure": "deployment round / in-process round", "value": f"{result['round_ratio']:.0f}x"},
        {"measure": "deployment first round (s, after the relay's discovery)", "value": f"{result['deploy_first_round_s']:.2f}"},
        {"measure": "same metrics as the in-process engine", "value": str(result["same_metrics"])},
    ]
    return (f"### Flower Deployment Engine on 127.0.0.1: {c['nodes']} nodes on {c['supernodes']} SuperNode(s), "
            f"{c['rounds']} rounds, {c['dataset']} {c['model']}, {c['algorithm']}, {c['local_work']} per round\n\n"
            + markdown_table(rows)
            + f"\n{result['messages']} messages ({result['failed_messages']} failed); the deployment took "
            f"{result['deploy_wall_s']:.0f} s, the benchmark {result['wall_s']:.0f} s in all.\n")
