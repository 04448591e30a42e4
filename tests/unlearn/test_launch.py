"""`samsuite unlearn ... --nproc K`: the command checked for K processes before any work, then run
as K processes (gloo on CPU) that give the one-process numbers: `unlearn eval` (default run) and the
whole `unlearn run` pipeline, whose folder a one-process rerun then finds finished (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from suite_fixtures import unlearn_settings

from experiments.cli import main
from shared.config import ConfigError
from unlearn.launch import check_nproc, without_nproc


def samsuite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter (the processes of --nproc write to its stdout)."""
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_each_process_runs_the_command_without_nproc() -> None:
    assert without_nproc(["unlearn", "run", "c.yaml", "--nproc", "2", "seeds=[0]"]) == ["unlearn", "run", "c.yaml",
                                                                                     "seeds=[0]"]
    assert without_nproc(["unlearn", "eval", "--nproc=4", "--model", "m"]) == ["unlearn", "eval", "--model", "m"]


def test_what_keeps_processes_from_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="nproc: expected an integer >= 1, got 0"):
        check_nproc(0, "cpu")
    with pytest.raises(ConfigError, match=r"nproc: 2 processes need 2 GPUs \(one each\); this machine has 0"):
        check_nproc(2, "cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"already one of 4 processes \(torchrun\); drop --nproc"):
        check_nproc(2, "cpu")


@pytest.mark.parametrize("extra, message", [
    ({"unlearn": {"objective": "npo", "lr": 1e-3, "steps": 2, "batch_size": 3}},
     ("error: methods[0].batch_size: 3 rows per micro-batch cannot be shared evenly by 2 processes; use a multiple "
      "of 2, or 1, 3 processes (--nproc)")),
    ({"methods": [{"objective": "npo", "smoother": "gp"}]},
     "error: methods[0].smoother: gp on 2 processes: its penalty needs a double backward"),
    ({"relearn": {"n_samples": 1, "batch_size": 2}},
     "error: relearn.n_samples: 1 text cannot be split over 2 processes; use at most 1 process (--nproc)"),
])
def test_what_the_processes_cannot_share_is_refused_before_any_work(
    unlearn_bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: dict[str, Any], message: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(unlearn_settings(unlearn_bench, tmp_path / "runs", **extra)))
    assert main(["unlearn", "run", str(config), "--nproc", "2"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # checked in the launching process: no run folder, no process


def test_nproc_below_one_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["unlearn", "eval", "--model", "m", "--benchmark", "toy", "--nproc", "0"]) == 2
    assert "Invalid value for '--nproc'" in capsys.readouterr().err


def test_eval_on_two_processes_gives_the_one_process_metrics(unlearn_bench: Path, tmp_path: Path) -> None:
    args = ["unlearn", "eval", "--model", str(unlearn_bench.parent / "models" / "target"), "--benchmark",
            str(unlearn_bench), "--max-samples", "5", "--batch-size", "2"]
    one = samsuite(*args, "--output", str(tmp_path / "one.json"))
    two = samsuite(*args, "--output", str(tmp_path / "two.json"), "--nproc", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert got["metrics"] == want["metrics"] and len(want["metrics"]) >= 5
    assert (got["environment"]["processes"], want["environment"]["processes"]) == (2, 1)
    assert two.stderr.count("metrics written to") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_run_on_two_processes_gives_the_one_process_results(unlearn_bench: Path, tmp_path: Path) -> None:
    """The pipeline on 2 processes: the one-process metrics (float32, to float tolerance), and a
    rerun on 1 process finds every stage done (the run's keys do not depend on the processes)."""
    runs = tmp_path / "runs"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(unlearn_settings(unlearn_bench, runs)))
    one = samsuite("unlearn", "run", str(config), "name=one", timeout=600)
    two = samsuite("unlearn", "run", str(config), "name=two", "--nproc", "2", timeout=600)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout.count("| npo+sam | 1 |") == 1

    def records(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]

    got, want = records("two"), records("one")
    assert [(r["stage"], r.get("method"), r.get("step")) for r in got] == \
        [(r["stage"], r.get("method"), r.get("step")) for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key, value in w.items():
            assert g[key] == (pytest.approx(value, rel=1e-4, abs=1e-5) if isinstance(value, float) else value), key
    for method in ("npo", "npo+sam"):
        losses = [[r["loss"] for r in map(json.loads, (runs / n / method / "seed0" / "train" / "metrics.jsonl")
                                          .read_text().splitlines())] for n in ("one", "two")]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary["environment"]["processes"] == 2

    before = {p: p.stat().st_mtime_ns for p in (runs / "two").rglob("*.json") if p.name != "summary.json"}
    again = samsuite("unlearn", "run", str(config), "name=two", timeout=600)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no stage ran again
    assert records("two") == got


@pytest.mark.slow
def test_prepare_on_two_processes_builds_the_one_process_models(tmp_path: Path) -> None:
    """The tokenizer trained once (rank 0) for both processes, the models trained sharded and saved whole."""
    from suite_fixtures import TINY_MODEL

    one = samsuite("unlearn", "prepare", "--out", str(tmp_path / "one"), *TINY_MODEL, "epochs=1")
    two = samsuite("unlearn", "prepare", "--out", str(tmp_path / "two"), *TINY_MODEL, "epochs=1", "--nproc", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    got, want = (json.loads((tmp_path / n / "prepare.json").read_text()) for n in ("two", "one"))
    assert got["settings"] == want["settings"] and got["vocab_size"] == want["vocab_size"]
    for name in ("target", "retrain"):
        for key in ("texts", "steps", "params"):
            assert got["models"][name][key] == want["models"][name][key]
        for key in ("last_step_loss", "forget_nll", "retain_nll"):
            assert got["models"][name][key] == pytest.approx(want["models"][name][key], rel=1e-4), (name, key)
    assert (tmp_path / "two" / "target" / "model.safetensors").is_file()
    assert got["environment"]["processes"] == 2
