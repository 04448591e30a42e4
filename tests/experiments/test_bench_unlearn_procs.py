"""`samsuite bench unlearn --nproc 2` in quick mode (2 spawned processes, gloo): the result's
structure and what must hold whatever the timings: each rank's sharded state is half of one
process's, the weights are those of one process, and the peak per rank is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.bench import unlearn_procs as bench


@pytest.mark.slow
def test_two_processes_halve_the_state_and_keep_the_weights(tmp_path: Path) -> None:
    result = bench.run(out_dir=tmp_path, nproc=2, quick=True, seed=0, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["procs.json", "procs.md"]
    assert json.loads((tmp_path / "procs.json").read_text()) == json.loads(json.dumps(result))
    one, two = result["layouts"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["time_ratio"] == one["memory_ratio"] == one["state_ratio"] == 1.0 and one["max_weight_diff"] == 0.0
    assert two["state_ratio"] == pytest.approx(0.5, abs=0.01)  # shards of odd-sized tensors differ by a row
    assert two["max_weight_diff"] < 1e-5  # float32, 3 AdamW steps
    assert len(two["peak_bytes_per_rank"]) == 2 and min(two["peak_bytes_per_rank"]) > 0
    assert "| 2 |" in (tmp_path / "procs.md").read_text()


def test_a_batch_the_processes_cannot_share_is_refused() -> None:
    with pytest.raises(ValueError, match="nproc: the benchmark's batch of 4 rows cannot be shared evenly by 3"):
        bench.run(nproc=3, quick=True)
