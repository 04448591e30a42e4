"""`samsuite bench seg --quick`: what its result holds and the invariants its numbers obey (the parallel
scan equals the reference, ratios are the ratios of the recorded times, targets recorded as measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from experiments.bench import seg
from experiments.cli import app


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-seg")
    result = CliRunner().invoke(app, ["bench", "seg", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "seg.json").read_text()), out


def test_writes_json_and_markdown(quick_run: tuple[dict, Path]) -> None:
    result, out = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["seg.json", "seg.md"]
    assert result["benchmark"] == "seg" and result["config"]["quick"] is True
    assert "Selective scan" in (out / "seg.md").read_text()


def test_scan_rows_are_consistent(quick_run: tuple[dict, Path]) -> None:
    scan = quick_run[0]["scan"]
    assert scan["max_rel_diff"] < 1e-4  # float32 outputs and gradients of both scans agree
    assert scan["speedup_forward"] == pytest.approx(scan["reference_forward_ms"] / scan["parallel_forward_ms"])
    assert scan["speedup_fwd_bwd"] == pytest.approx(scan["reference_fwd_bwd_ms"] / scan["parallel_fwd_bwd_ms"])


def test_sam_row_and_targets(quick_run: tuple[dict, Path]) -> None:
    result = quick_run[0]
    (row,) = result["sam"]
    assert row["ratio"] == pytest.approx(row["sam_step_ms"] / row["sgd_step_ms"]) and row["ratio"] > 1
    assert [t["met"] for t in result["targets"]] == [
        result["scan"]["speedup_fwd_bwd"] >= seg.SCAN_TARGET, result["scan"]["speedup_forward"] >= seg.SCAN_TARGET,
        row["ratio"] <= seg.SAM_FLOOR]
    assert result["all_targets_met"] == all(t["met"] for t in result["targets"])
