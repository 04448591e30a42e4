"""Nothing is lost: a run killed at any write resumes into exactly the uninterrupted run (train, fed and
the unlearning loop, killed before, inside and after every file write), a real SIGKILL too, and
damaged run state is either recovered from without loss or refused with the file and the fix named."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from suite_fixtures import Killed, kill_everywhere, strip

from experiments.train import TrainConfig, run_train
from fedsam.config import FedConfig
from fedsam.engine import run_inprocess
from shared.checkpoint import load_checkpoint
from shared.runio import RunDir

REPO = Path(__file__).parents[2]


def test_fed_survives_a_kill_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(name: str) -> None:
        run_inprocess(FedConfig(out_dir=str(tmp_path), name=name, num_nodes=4, rounds=2, local_steps=2), progress=False)

    def result(name: str) -> Any:
        state = load_checkpoint(tmp_path / name / "checkpoint.safetensors")
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return strip(RunDir(tmp_path / name).metrics()), state["X"].tolist(), state["round"], {
            k: v for k, v in summary["results"].items() if k not in ("run", "time_s")}

    assert kill_everywhere(monkeypatch, run, result) >= 2 * 10


def test_train_survives_a_kill_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(name: str) -> None:
        run_train(TrainConfig(out_dir=str(tmp_path), name=name, optimizers=["sgd", "sam"], epochs=2,
                              model_options={"width": 4}, batch_size=512))

    def result(name: str) -> Any:
        state = load_checkpoint(tmp_path / name / "checkpoint.safetensors")
        weights = {k: v.tolist() for k, v in state["arms"]["sam"]["model"].items()}
        rows = json.loads((tmp_path / name / "summary.json").read_text())["results"]
        return strip(RunDir(tmp_path / name).metrics()), weights, [{k: r[k] for k in ("test_acc", "final_test_acc")}
                                                                  for r in rows]

    assert kill_everywhere(monkeypatch, run, result) >= 2 * 10


def test_a_real_sigkill_mid_run_resumes_into_the_same_run(tmp_path: Path, cli) -> None:
    settings = ["num_nodes=4", "rounds=6", "local_steps=4", "--no-progress"]
    args = [sys.executable, "-m", "experiments.cli", "fed", "run", f"out_dir={tmp_path}", *settings]
    assert cli("fed", "run", f"out_dir={tmp_path / 'ref'}", *settings).exit_code == 0
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = next(tmp_path.glob("*/metrics.jsonl"), None)
    deadline = time.time() + 120
    while time.time() < deadline and (metrics is None or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
        metrics = metrics or next(tmp_path.glob("*/metrics.jsonl"), None)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    run = metrics.parent
    assert len(RunDir(run).metrics()) < 6  # killed mid-run
    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert strip(RunDir(run).metrics()) == strip(RunDir(tmp_path / "ref" / run.name).metrics())


# ------------------------------------------------------------------------------------------------ damaged state
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x07" * 64)


def missing_tensor(path: Path) -> None:
    """The state in the header names a tensor that the file no longer holds."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path), metadata=meta)


def torn_last_line(path: Path) -> None:
    path.write_text(path.read_text() + '{"round": 99, "tra')


def lost_last_record(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def damaged_first_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0][:10] + "\n" + "".join(lines[1:]))


DAMAGE = {  # (file, damage, expected): expected "resumes" or a regex of the one-line error
    "truncated checkpoint": ("checkpoint.safetensors", truncate,
                             r"checkpoint.safetensors: is not a readable samsuite checkpoint .*resume=false"),
    "garbage checkpoint": ("checkpoint.safetensors", garbage, r"checkpoint.safetensors: is not a readable"),
    "checkpoint without a tensor": ("checkpoint.safetensors", missing_tensor,
                                    r"checkpoint.safetensors: names a tensor .* that it does not hold.*resume=false"),
    "torn last metrics line": ("metrics.jsonl", torn_last_line, "resumes"),
    "metrics with a lost record": ("metrics.jsonl", lost_last_record,
                                   r"metrics.jsonl: holds \d+ complete records but the checkpoint .* was saved after "
                                   r"\d+; records were lost or removed. Restore the file, or set resume=false"),
    "damaged metrics line": ("metrics.jsonl", damaged_first_line,
                             r"metrics.jsonl, line 1: not a JSON record .*resume=false"),
}
COMMANDS = {
    "fed": ["fed", "run", "name=r", "num_nodes=4", "local_steps=2", "rounds=3", "--no-progress"],
    "train": ["train", "name=r", "model_options.width=4", "optimizers=[sgd, sam]", "epochs=2"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_state_is_named_or_recovered_without_loss(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                          command: str, damage: str) -> None:
    args = COMMANDS[command]
    assert cli(*args, f"out_dir={tmp_path / 'ref'}").exit_code == 0
    want = strip(RunDir(tmp_path / "ref" / "r").metrics())
    with monkeypatch.context() as m:  # killed right after its first checkpoint
        real = RunDir.save_checkpoint

        def save_then_die(run: RunDir, state: dict[str, Any]) -> None:
            real(run, state)
            raise Killed

        m.setattr(RunDir, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            cli(*args, f"out_dir={tmp_path}")
    file, hurt, expected = DAMAGE[damage]
    hurt(tmp_path / "r" / file)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    result = cli(*args, f"out_dir={tmp_path}")
    assert "Traceback" not in result.output
    if expected == "resumes":
        assert result.exit_code == 0, result.output
        assert strip(RunDir(tmp_path / "r").metrics()) == want  # nothing lost, nothing repeated
        return
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert str(tmp_path / "r") in result.output and re.search(expected, result.output), result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
    fresh = cli(*args, f"out_dir={tmp_path}", "resume=false")  # the fix the message names
    assert fresh.exit_code == 0, fresh.output
    assert strip(RunDir(tmp_path / "r").metrics()) == want


def test_a_diverged_fed_run_logs_no_diverged_round(tmp_path: Path, cli) -> None:
    result = cli("fed", "run", f"out_dir={tmp_path}", "name=d", "num_nodes=4", "local_steps=2", "rounds=4",
                 "lr=2", "max_loss=20", "--no-progress")
    assert result.exit_code == 1 and "the loss diverged" in result.output, result.output
    records = RunDir(tmp_path / "d").metrics()
    assert all(abs(r["train_loss"]) <= 20 for r in records)
    state = load_checkpoint(tmp_path / "d" / "checkpoint.safetensors")
    assert state is None or state["round"] == len(records)
    assert torch.isfinite(state["X"]).all() if state is not None else True
