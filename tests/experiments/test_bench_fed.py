"""`samsuite bench fed --quick`: what its result holds and the invariants its numbers must obey
(stacked mixing equals the loop, a round lasts at least its compute, targets recorded as
measured); never its timings, which are not tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from experiments.bench import fed
from experiments.cli import app


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-fed")
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["bench", "fed", "--quick", "--no-flower", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads, "the bench must restore the thread count"
    return json.loads((out / "fed.json").read_text()), out


def test_writes_json_and_markdown(quick_run: tuple[dict, Path]) -> None:
    result, out = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["fed.json", "fed.md"]
    assert result["benchmark"] == "fed" and result["config"]["quick"] is True and result["config"]["flower"] is False
    report = (out / "fed.md").read_text()
    assert "ring Q=4" in report and "in-process round / summed local compute" in report
    assert "Flower" not in report  # --no-flower


def test_mixing_rows_are_measured_and_correct(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    rows = result["mixing"]
    assert [(r["topology"], r["q"]) for r in rows] == list(fed.MIX_GRAPHS)
    for r in rows:
        assert r["model"] == "digits CNN" and r["parameters"] == 29162 and r["tensors"] == 8
        assert r["max_abs_diff"] < 1e-5, r  # the stacked result is the loop's
        for key in ("stacked_ms", "loop_ms", "copy_ms"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["speedup"] == pytest.approx(r["loop_ms"] / r["stacked_ms"])
        assert r["ceiling"] == pytest.approx(r["loop_ms"] / r["copy_ms"])
    methods = {(r["topology"], r["q"]): r["method"] for r in rows}
    assert methods == {("ring", 1): "sparse", ("ring", 4): "sparse", ("exponential", 1): "dense", ("full", 1): "dense"}


def test_engine_round_covers_its_compute(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    engine = result["engine"]
    assert engine["nodes"] == 20 and engine["measured_rounds"] == [2, 3]
    assert engine["inprocess_round_s"] >= engine["inprocess_compute_s"] > 0
    assert engine["overhead_ratio"] >= 1.0 and engine["overhead_ratio_eval_round"] >= 1.0
    assert "flower_round_s" not in engine


def test_targets_are_recorded_as_measured(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    targets = result["targets"]
    assert len(targets) == len(result["mixing"]) + 2  # quick: no N=100 row, so no batched speed target
    for t, r in zip(targets, result["mixing"]):
        assert t["value"] == r["speedup"] and t["met"] == (r["speedup"] >= fed.MIX_TARGET)
    assert targets[-2]["met"] == (result["engine"]["overhead_ratio"] <= fed.OVERHEAD_TARGET)
    assert targets[-1]["met"] == all(r["same_metrics"] for r in result["batched"])
    assert result["all_targets_met"] == all(t["met"] for t in targets)


def test_batched_rows_are_measured_and_consistent(quick_run: tuple[dict, Path]) -> None:
    result, out = quick_run
    (row,) = result["batched"]  # quick: the digits CNN at N = 10
    assert (row["model"], row["nodes"], row["device"]) == ("digits CNN", 10, "cpu")
    assert row["same_metrics"] is True
    assert row["speedup"] > 0 and row["sequential_round_s"] > 0 and row["batched_round_s"] > 0
    assert 0 <= row["padded_share"] < 1 and 1 <= row["passes"] <= 10 and row["node_steps"] >= 10
    assert row["batched_ms_per_node_step"] == pytest.approx(1e3 * row["batched_round_s"] / row["node_steps"])
    assert "Batched engine" in (out / "fed.md").read_text()


@pytest.mark.slow
def test_flower_part(tmp_path: Path) -> None:
    """The engine part with the Flower simulation: both engines, the same metrics."""
    engine = fed.bench_engines(rounds=3, seed=0, threads=1, flower=True)
    assert engine["same_metrics"] is True
    assert engine["flower_round_s"] >= engine["flower_compute_s"] > 0
    assert engine["flower_over_inprocess"] > 0 and math.isfinite(engine["flower_overhead_per_message_ms"])
