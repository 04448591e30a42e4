"""The local Deployment Engine (`fedsam.deploy`, `samsuite fed deploy`): the run config it hands
to `flwr run`, its early errors, and (slow) real SuperLink + SuperNode processes on 127.0.0.1:
the in-process metrics, a SuperNode killed mid-run, a failed ServerApp's non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli  # flwr depends on it; tomllib is stdlib from Python 3.11 only
from suite_fixtures import assert_same_records as assert_same
from suite_fixtures import metric_records as records

from fedsam.client import local_update
from fedsam.config import FedConfig
from fedsam.deploy import LocalDeployment, _toml, check_declared, declared_keys, run_config_of
from fedsam.engine import run_inprocess
from fedsam.messages import fed_config_from_run_config
from fedsam.run import FedRun
from shared.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def small(tmp_path: Path, name: str, **kw: Any) -> FedConfig:
    settings: dict[str, Any] = {"engine": "flower", "num_nodes": 4, "rounds": 3, "local_steps": 2, "partitioner": "iid",
                                "out_dir": str(tmp_path), "name": name, "resume": False, **kw}
    return FedConfig(**settings)


def test_the_run_config_round_trips_and_is_valid_toml(tmp_path: Path) -> None:
    cfg = FedConfig(num_nodes=6, topology="random-k", topology_options={"k": 2}, momentum=None, optimizer="gsam",
                    optimizer_options={"alpha": 0.2}, out_dir=str(tmp_path), name="a b'c\"")
    run_config = run_config_of(cfg, round_timeout=5, node_wait=7.5)
    assert run_config["round-timeout"] == 5.0 and run_config["momentum"] == "" and run_config["topology-options.k"] == 2
    assert tomli.loads(_toml(run_config)) == run_config
    assert fed_config_from_run_config(run_config) == cfg
    check_declared(run_config, declared_keys())  # every key is one pyproject.toml declares


def test_undeclared_option_keys_and_bad_sizes_are_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = FedConfig(num_nodes=4, optimizer="saf", optimizer_options={"past": 1}, out_dir=str(tmp_path), name="x")
    with pytest.raises(ConfigError, match=r"optimizer-options.past: Flower's run config only takes the keys declared"):
        LocalDeployment(cfg, 2)
    for supernodes, field in ((0, "supernodes"), (5, "supernodes"), (True, "supernodes")):
        with pytest.raises(ConfigError, match=rf"{field}: expected an integer in \[1, num_nodes=4\]"):
            LocalDeployment(small(tmp_path, "x"), supernodes)
    with pytest.raises(ConfigError, match="round-timeout: expected a number of seconds > 0"):
        LocalDeployment(small(tmp_path, "x"), 2, round_timeout=0)
    assert list(tmp_path.iterdir()) == []  # nothing written


needs_flower = pytest.mark.skipif(shutil.which("flower-superlink") is None or not Path("/proc").is_dir(),
                                  reason="needs Flower's CLIs and /proc")


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
            .lower()]


@pytest.mark.slow
@needs_flower
def test_a_deployment_gives_the_inprocess_metrics_and_stops_its_processes(tmp_path: Path) -> None:
    cfg = small(tmp_path, "deployed")
    with LocalDeployment(cfg, 2, round_timeout=120, node_wait=60) as dep:
        pids = [p.pid for p in dep.procs.values()]
        summary = dep.run()
    assert summary["deployment"]["status"] == "finished:completed"
    assert not alive(pids)
    got = records(tmp_path / "deployed")
    run_inprocess(fed_config_from_run_config({**run_config_of(cfg), "name": "inprocess"}), progress=False)
    assert_same(got, records(tmp_path / "inprocess"))
    log = [json.loads(line) for line in (tmp_path / "deployed" / "messages.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all(m["status"] == "ok" and m["process_s"] > m["compute_s"] for m in log)


@pytest.mark.slow
@needs_flower
def test_a_killed_supernodes_nodes_fail_and_the_run_goes_on(tmp_path: Path) -> None:
    """SuperNode 1 (nodes 1 and 3) is killed once round 1 is recorded: its nodes fail in rounds
    2 and 3 (never re-routed), and the metrics equal an in-process replay of those failures."""
    cfg = small(tmp_path, "killed")
    with LocalDeployment(cfg, 2, round_timeout=45, node_wait=60) as dep:
        run_id = dep.submit()
        result: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: result.update(dep.wait(run_id)))
        waiter.start()
        _wait_for_rounds(tmp_path / "killed", 1)
        dep.stop_process("supernode-1")
        waiter.join(timeout=600)
    assert result.get("status") == "finished:completed"
    got = records(tmp_path / "killed")
    assert [r["failed"] for r in got] == [[], [1, 3], [1, 3]]
    failed = {1: [1, 3], 2: [1, 3]}
    ref = fed_config_from_run_config({**run_config_of(cfg), "name": "replay"})
    with FedRun(ref, progress=False) as run:
        for r in range(ref.rounds):
            updates = {i: local_update(x, i, r, ref, run.data) for i, x in run.round_tasks(r) if i not in failed.get(r, [])}
            run.finish_round(r, updates, failed=failed.get(r, []))
    assert_same(got, records(tmp_path / "replay"))


@pytest.mark.slow
@needs_flower
def test_a_failed_serverapp_exits_non_zero(tmp_path: Path) -> None:
    """A diverging run stops the ServerApp: `samsuite fed deploy` says so and exits 1 (where
    `flwr run --stream` would exit 0), and no process of the deployment is left."""
    cmd = [sys.executable, "-m", "experiments.cli", "fed", "deploy", "--supernodes", "2", "--node-wait", "60",
           "num_nodes=4", "rounds=2", "local_steps=2", "partitioner=iid", "lr=50", "max_loss=1",
           f"out_dir={tmp_path}", "name=diverged"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env={**os.environ}, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ended finished:failed" in done.stderr and "diverged" in done.stderr, done.stderr
    superlink_log = (tmp_path / ".deploy-diverged" / "superlink.log").read_text()
    assert "127.0.0.1" in superlink_log and "0.0.0.0" not in superlink_log  # listens on loopback only


def _wait_for_rounds(run_dir: Path, rounds: int, timeout_s: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rounds:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: fewer than {rounds} rounds after {timeout_s} s")


@pytest.mark.slow
@needs_flower
def test_a_deployment_stopped_mid_run_resumes_to_the_uninterrupted_metrics(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process is stopped once round 1 is recorded (as a crash of the whole deployment); a new
    deployment of the same config (resume, relative out_dir) finishes the run with the metrics of
    an uninterrupted in-process run."""
    monkeypatch.chdir(tmp_path)  # out_dir="runs" is relative to here, not to the SuperLink's folder
    cfg = small(Path("runs"), "resumed", resume=True)
    with LocalDeployment(cfg, 2, round_timeout=120, node_wait=60) as dep:
        dep.submit()
        _wait_for_rounds(tmp_path / "runs" / "resumed", 1)
    with LocalDeployment(cfg, 2, round_timeout=120, node_wait=60) as dep:
        summary = dep.run()
    assert summary["final"]["round"] == 3
    got = records(tmp_path / "runs" / "resumed")
    run_inprocess(small(tmp_path, "uninterrupted"), progress=False)
    assert_same(got, records(tmp_path / "uninterrupted"))
    rounds = [json.loads(line)["round"] for line in (tmp_path / "runs" / "resumed" / "messages.jsonl").read_text()
              .splitlines()]
    assert sorted(set(rounds)) == [1, 2, 3] and len(rounds) == 12  # the repeated round's lines are not doubled
