"""Helpers that tests of several folders share (importable: pytest puts tests/ on sys.path with its conftest)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared import runio
from shared.runio import RunDir

TIMING = ("compute_s", "round_s", "time_s", "step_time_s", "train_time_s", "eval_time_s", "time")


# ------------------------------------------------------------------ several processes
def _gloo_main(rank: int, world: int, folder: str, worker: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import pickle

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = worker(rank, *args)
    if rank == 0:
        Path(folder, "out.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def on_gloo(worker: Callable[..., Any], world: int, folder: Path, *args: Any) -> Any:
    """`worker(rank, *args)` on `world` CPU processes in one gloo group (meeting through a file in
    `folder`); what rank 0's call returned. `worker` must be a module-level function (it is pickled)."""
    import pickle

    import torch.multiprocessing as mp

    mp.spawn(_gloo_main, args=(world, str(folder), worker, args), nprocs=world, join=True)
    return pickle.loads((folder / "out.pkl").read_bytes())

TINY_MODEL = ["tiny.vocab_size=320", "tiny.hidden_size=16", "tiny.intermediate_size=32", "tiny.num_hidden_layers=2",
              "tiny.num_attention_heads=2", "tiny.max_length=96", "epochs=2", "batch_size=8", "warmup_steps=0",
              "max_length=96"]


def unlearn_settings(bench_dir: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """A `samsuite unlearn run` config on the `unlearn_bench` fixture that runs in seconds (NPO vs NPO+SAM)."""
    return {
        "name": "small", "out_dir": str(out), "benchmark": str(bench_dir), "device": "cpu",
        "unlearn": {"objective": "npo", "lr": 1e-3, "steps": 2, "batch_size": 2, "max_length": 96, "rho": 0.1,
                    "save_every": 1},
        "methods": [{"objective": "npo"}, {"objective": "npo", "smoother": "sam"}],
        "relearn": {"n_samples": 3, "draws": 2, "lr": 1e-3, "steps": 2, "batch_size": 2, "max_length": 96,
                    "eval_every": 1},
        "eval": {"max_samples": 4, "batch_size": 8},
        **extra,
    }


# ------------------------------------------------------------------ kills at every write
def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their wall-clock fields (the only ones a resumed run may change)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class Killed(BaseException):
    """A simulated kill: nothing catches it (it is not an Exception)."""


class Writes:
    """Counts the run's file writes (every atomic replace and every metrics record) and kills the run
    at write number `at`: before it, after it, or (a metrics record) half-way through its line."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None = None, mode: str = "before") -> None:
        self.count, self.at, self.mode = 0, at, mode
        self.kinds: list[str] = []  # of each write: "replace" (atomic, so before or after) or "log"
        real_replace, real_log = os.replace, RunDir.log

        def replace(src: Any, dst: Any) -> None:
            self._tick("replace", lambda: real_replace(src, dst), lambda: None)

        def log(run: RunDir, record: dict[str, Any]) -> None:
            def torn() -> None:
                with run.metrics_path.open("a") as handle:
                    handle.write(json.dumps(record)[:7])

            self._tick("log", lambda: real_log(run, record), torn)

        monkeypatch.setattr(runio.os, "replace", replace)
        monkeypatch.setattr(RunDir, "log", log)

    def _tick(self, kind: str, write: Callable[[], None], partial: Callable[[], None]) -> None:
        self.count += 1
        self.kinds.append(kind)
        if self.count != self.at:
            return write()
        if self.mode == "after":
            write()
        elif self.mode == "inside":
            partial()
        raise Killed(f"write {self.count}")


# A rename is atomic: killed before it or after it. A record is appended: killed in it or after it
# (killed before it is killed after the write before).
MODES = {"replace": ("before", "after"), "log": ("inside", "after")}


def kill_everywhere(monkeypatch: pytest.MonkeyPatch, run: Callable[[str], Any], result: Callable[[str], Any]
                    ) -> int:
    """Run once to count the writes; then for every write and mode: kill there, resume, and compare with
    the uninterrupted run. Returns how many kills were survived."""
    with monkeypatch.context() as m:
        counter = Writes(m)
        run("reference")
    want, survived = result("reference"), 0
    for at, kind in enumerate(counter.kinds, 1):
        for mode in MODES[kind]:
            name = f"kill-{at}-{mode}"
            with monkeypatch.context() as m:
                Writes(m, at, mode)
                try:
                    run(name)
                except Killed:
                    pass
            run(name)  # resumes
            assert result(name) == want, f"killed {mode} write {at}"
            survived += 1
    return survived


def kill_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> None:
    """Call `run` (a fedsam run) with the run killed (KeyboardInterrupt) right after its first checkpoint."""
    from fedsam import run as run_module

    real_save = run_module.FedRun._save_checkpoint
    calls = {"n": 0}

    def save_then_die(self: run_module.FedRun) -> None:
        real_save(self)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(run_module.FedRun, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run()


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Every non-timing field of every record equal (floats to 1e-6): two engines' runs of one config."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in set(w) - set(TIMING):
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-6), (w.get("round"), key)
            else:
                assert g[key] == w[key], (w.get("round"), key)
