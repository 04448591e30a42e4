"""`samsuite bench unlearn` in quick mode: the structure of its result and the memory accounting,
never its timings (timings are not tests; the targets are recorded, not asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments.bench import unlearn as bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    out_dir = tmp_path_factory.mktemp("bench")
    threads_before = torch.get_num_threads()
    result = bench.run(out_dir=out_dir, quick=True, seed=0, threads=1)
    assert torch.get_num_threads() == threads_before, "run() must restore the thread count"
    return result, out_dir


def test_writes_json_and_markdown(quick_run) -> None:
    result, out_dir = quick_run
    assert sorted(p.name for p in out_dir.iterdir()) == ["unlearn.json", "unlearn.md"]
    assert json.loads((out_dir / "unlearn.json").read_text()) == json.loads(json.dumps(result))
    md = (out_dir / "unlearn.md").read_text()
    assert "| npo+sam |" in md and "NPO+SAM step time / NPO step time" in md


def test_every_candidate_timed_and_measured(quick_run) -> None:
    result, _ = quick_run
    rows = result["candidates"]
    assert list(rows) == [bench.NPO, bench.SAM, bench.RECOMPUTE]
    assert rows[bench.NPO]["time_ratio"] == pytest.approx(1.0) and rows[bench.NPO]["memory_ratio"] == pytest.approx(1.0)
    for row in rows.values():
        assert math.isfinite(row["median_step_s"]) and row["median_step_s"] > 0
        assert row["samples"] == result["config"]["rounds"] and row["peak_bytes"] > 0
    assert result["environment"]["versions"]["torch"] == torch.__version__
    assert result["cache_speedup"] == rows[bench.RECOMPUTE]["time_ratio"]


def test_sam_costs_no_copy_of_the_weights_and_recomputing_one(quick_run) -> None:
    """The peaks differ by what each variant keeps: SAM nothing the size of the weights (w + e is
    built in the dropped forget gradients), the recomputing NPO one frozen copy of the model."""
    result, _ = quick_run
    rows = result["candidates"]
    weights = result["config"]["parameters"] * 4  # float32
    extra = {key: rows[key]["peak_bytes"] - rows[bench.NPO]["peak_bytes"] for key in (bench.SAM, bench.RECOMPUTE)}
    assert abs(extra[bench.SAM]) <= 0.05 * weights, (extra, weights)
    assert 0.9 * weights <= extra[bench.RECOMPUTE] <= 1.2 * weights, (extra, weights)


def test_targets_are_recorded_not_enforced(quick_run) -> None:
    result, _ = quick_run
    names = [c["name"] for c in result["targets"]]
    assert names == ["NPO+SAM step time / NPO step time", "NPO+SAM peak memory / NPO peak memory"]
    for check in result["targets"]:
        assert check["met"] == (check["value"] <= check["bound"])
    assert result["all_targets_met"] == all(c["met"] for c in result["targets"])
