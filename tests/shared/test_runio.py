import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared import SAM
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import ConfigError, RunStateError
from shared.runio import LOCK_FILE, RUN_FILE, RunDir, check_out_dir, check_run_name, environment
from shared.seeding import derive_seed


def test_metrics_are_appended_and_torn_lines_ignored(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    run.log({"step": 1, "loss": 0.5})
    run.log({"step": 2, "loss": 0.25})
    with run.metrics_path.open("a") as handle:
        handle.write('{"step": 3, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in run.metrics()] == [1, 2]
    run.truncate_metrics(1)
    assert run.metrics() == [{"step": 1, "loss": 0.5}]
    path = run.write_json("summary.json", {"env": environment()})
    assert json.loads(path.read_text())["env"]["versions"]["torch"] == torch.__version__
    assert not list(run.path.glob("*.tmp"))


def test_checkpoint_round_trips_model_and_optimizer_state(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = SAM(model.parameters(), "adamw", rho=0.1, lr=1e-2)
    x = torch.randn(8, 3)
    model(x).square().mean().backward()
    opt.step(lambda: model(x).square().mean().backward())
    save_checkpoint(tmp_path / "ck.safetensors", {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # one file: tensors and state together
    state = load_checkpoint(tmp_path / "ck.safetensors")
    assert state["epoch"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    fresh = SAM(torch.nn.Linear(3, 2).parameters(), "adamw", rho=0.3, lr=1.0)
    fresh.load_state_dict(state["opt"])
    assert fresh.param_groups[0]["rho"] == 0.1 and fresh.param_groups[0]["lr"] == 1e-2
    assert torch.equal(fresh.base_optimizer.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert load_checkpoint(tmp_path / "absent.safetensors") is None


def _damaged_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"round": 3, "X": torch.arange(6.0).reshape(2, 3)})
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) - 7], "header only": data[:40], "empty": b"", "garbage": b"\x00" * 100}
    out = {}
    for name, content in cases.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        out[name].write_bytes(content)
    out["no state"] = tmp_path / "plain.safetensors"
    save_file({"X": torch.zeros(2)}, str(out["no state"]))  # a safetensors file that is not a checkpoint
    out["missing tensor"] = tmp_path / "missing.safetensors"
    save_file({"Y": torch.zeros(2)}, str(out["missing tensor"]),
              metadata={"samsuite.state": json.dumps({"__dict__": [["X", {"__tensor__": "X"}]]})})
    return out


@pytest.mark.parametrize("case", ["truncated", "header only", "empty", "garbage", "no state", "missing tensor"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file_and_the_fix(tmp_path: Path, case: str) -> None:
    path = _damaged_checkpoints(tmp_path)[case]
    with pytest.raises(RunStateError, match=rf"^{path}: .*resume=false"):
        load_checkpoint(path)


def test_torn_and_damaged_metric_lines(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    for step in (1, 2, 3):
        run.log({"step": step})
    text = run.metrics_path.read_text()
    run.metrics_path.write_text(text + '{"step": 4, "lo')  # torn last line: left out
    assert [r["step"] for r in RunDir(run.path).metrics()] == [1, 2, 3]
    again = RunDir(run.path)
    again.log({"step": 4})  # appending after a torn line drops it first
    assert [r["step"] for r in again.metrics()] == [1, 2, 3, 4]
    lines = run.metrics_path.read_text().splitlines()
    run.metrics_path.write_text("\n".join([lines[0], '{"step": 2', *lines[2:]]) + "\n")  # damaged inside
    with pytest.raises(RunStateError, match=r"metrics.jsonl, line 2: not a JSON record.*resume=false"):
        RunDir(run.path).metrics()


def test_checkpoints_record_their_metrics_and_resume_cuts_back_to_them(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.log({"round": 1})
    run.log({"round": 2})
    run.save_checkpoint({"round": 2})
    run.log({"round": 3})  # logged after the checkpoint (a kill before the next one)
    seen = []
    state = RunDir(run.path).load_checkpoint(check=seen.append)
    assert state == {"round": 2} and seen == [{"round": 2}]
    assert [r["round"] for r in run.metrics()] == [1, 2]  # the record past the checkpoint is gone

    def refuse(state: dict) -> None:
        raise ConfigError("different config")

    run.log({"round": 3})
    with pytest.raises(ConfigError, match="different config"):
        RunDir(run.path).load_checkpoint(check=refuse)
    assert len(run.metrics()) == 3  # a refused resume changes nothing
    run.truncate_metrics(1)  # records lost: the checkpoint says 2
    with pytest.raises(RunStateError, match=r"holds 1 complete records but the checkpoint .* after 2.*resume=false"):
        RunDir(run.path).load_checkpoint()


@pytest.mark.parametrize("name", ["", " ", "../x", "../../x", "/abs", "a/b", "a\\b", ".", "..", ".hidden", "a\nb", 3])
def test_run_names_that_would_leave_out_dir_are_refused(name: object) -> None:
    with pytest.raises(ConfigError, match="^name: "):
        check_run_name(name)


def test_out_dir_that_is_a_file_or_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"^out_dir: .*file is a file, not a folder"):
        check_out_dir(afile)
    with pytest.raises(ConfigError, match=r"^out_dir: .*file/sub cannot be created: .*file is a file"):
        check_out_dir(afile / "sub")
    check_out_dir(tmp_path / "new" / "deeper")  # creatable
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(ConfigError, match=r"^out_dir: .* is not writable"):
        check_out_dir(tmp_path / "new")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_out_dir(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_claim_marks_the_kind_refuses_other_kinds_and_leaves_no_trace_when_unused(tmp_path: Path) -> None:
    with RunDir.claim(tmp_path / "runs", "a", "fed") as run:
        assert (run.path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "runs").exists()  # nothing written: the folder it created is gone again
    with RunDir.claim(tmp_path, "a", "fed") as run:
        run.write_config({"x": 1})
    assert json.loads((tmp_path / "a" / RUN_FILE).read_text())["kind"] == "fed"
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with pytest.raises(RunStateError, match=r"holds a 'fed' run .*not a 'unlearn' run"):
        RunDir.acquire(tmp_path, "a", "unlearn")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunStateError, match=r"not a samsuite train run folder .*notes.txt"):
        RunDir.acquire(tmp_path, "foreign", "train")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_one_process_per_run_folder_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    holder = RunDir.acquire(tmp_path, "r", "fed")
    with pytest.raises(RunStateError, match=rf"another samsuite process \(pid {os.getpid()}\) is running"):
        RunDir.acquire(tmp_path, "r", "fed")
    holder.release()
    RunDir.acquire(tmp_path, "r", "fed").release()
    script = textwrap.dedent(f"""
        import os, sys
        from shared.runio import RunDir
        RunDir.acquire({str(tmp_path)!r}, "r", "fed")
        print("held", flush=True)
        os.kill(os.getpid(), 9)  # dies holding the lock
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2],
                           check=False)
    assert child.stdout.strip() == "held" and child.returncode == -9
    assert (tmp_path / "r" / LOCK_FILE).exists()  # its lock file is still there ...
    RunDir.acquire(tmp_path, "r", "fed").release()  # ... but the lock died with it


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "node", 3) == derive_seed(0, "node", 3)
    assert len({derive_seed(0, "node", i) for i in range(100)} | {derive_seed(1, "node", 0)}) == 101
