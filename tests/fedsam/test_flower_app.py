"""The Flower app: run-config mapping, the ClientApp handler on hand-built Messages, the ServerApp
relay against the in-process engine (same metrics), failed and silent nodes, and (slow) the same
through Flower's Ray simulation and through `flwr run .`.

The fast tests drive the real ServerApp and ClientApp objects through `LocalGrid`, a Grid that
hands each message to the ClientApp in this process, as Flower's simulation worker does (an
exception becomes an error reply), so they need neither Ray nor a SuperLink."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from suite_fixtures import assert_same_records as assert_same_metrics
from suite_fixtures import metric_records as records

from fedsam import client_app as client_module
from fedsam import server_app as server_module
from fedsam.client import federated_data, initial_state, local_update
from fedsam.client_app import build_client_app
from fedsam.config import FedConfig
from fedsam.deploy import free_port
from fedsam.engine import run_inprocess
from fedsam.messages import MEMBER_KEY, fed_config_from_run_config, relay_seconds, served_nodes
from fedsam.partitions import export_partitions
from fedsam.run import FedRun
from fedsam.server_app import build_server_app, run_flower
from shared.config import ConfigError
from shared.errors import Diverged, RunError

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"compute_s", "round_s", "time_s"}  # wall-clock fields: differ between any two runs
NODES = 4  # a ring of 4 is not the full graph, so consensus distance is not zero after mixing


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has: Messages take their run and sender from TaskIdentity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def pyproject_run_config() -> dict[str, Any]:
    """The flat run config `flwr run .` starts from, validated as `flwr run` validates pyproject.toml."""
    config, warnings = load_and_validate(ROOT / "pyproject.toml")
    assert warnings == []
    return dict(flatten_dict(config["tool"]["flwr"]["app"]["config"]))


def small(**kw: Any) -> dict[str, Any]:
    """Run-config overrides for a tiny digits run: 4 nodes, 2 rounds of 2 local steps."""
    return {"num-nodes": NODES, "partitioner": "iid", "rounds": 2, "local-steps": 2, "batch-size": 32,
            "resume": False, **kw}


class LocalGrid(Grid):
    """Delivers every message to `client_app` in this process. SuperNode k (of ids that are
    unsorted on purpose) has node-config partition-id=k num-partitions=S, plus `node_config`;
    `silent` (node, round) pairs never reply (a timeout); SuperNode k of `gone` {k: r} leaves the
    federation once round r (from 0) has been sent."""

    def __init__(self, client_app: ClientApp, supernodes: int, run_config: dict[str, Any] | None = None,
                 silent: Iterable[tuple[int, int]] = (), node_config: dict[str, Any] | None = None,
                 gone: dict[int, int] | None = None) -> None:
        self.client_app = client_app
        self.ids = [(7919 * (k + 3)) % 10007 for k in range(supernodes)]
        self.contexts = {i: Context(1, i, {"partition-id": k, "num-partitions": supernodes, **(node_config or {})},
                                    RecordDict(), run_config or {}) for k, i in enumerate(self.ids)}
        self.silent = set(silent)
        self.gone = {self.ids[k]: r for k, r in (gone or {}).items()}
        self.sent_round = -1
        self.delivered: list[tuple[int, int, int]] = []  # (supernode, node, round) of the train messages
        self.queried: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return [i for i in self.ids if self.gone.get(i, math.inf) > self.sent_round]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as flwr's InMemoryGrid.push_messages does
            key = None
            assert msg.metadata.ttl == timeout  # the relay's timeout is also the messages' time-to-live
            if msg.metadata.message_type == MessageType.QUERY:
                self.queried.append(msg.metadata.dst_node_id)
            else:
                task = msg.content["config"]
                key = (int(task["node"]), int(task["round"]))
                self.sent_round = max(self.sent_round, key[1])
                self.delivered.append((msg.metadata.dst_node_id, *key))
                assert msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id == str(key[1])
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as ex:  # noqa: BLE001  (any ClientApp error becomes an Error reply, as Flower does)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(ex)), reply_to=msg)
            if key not in self.silent:
                replies.append(reply)
        return replies[::-1]  # replies come back in any order

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def inprocess_records(tmp_path: Path, run_config: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = fed_config_from_run_config({**run_config, "name": "inprocess", "out-dir": str(tmp_path)})
    run_inprocess(cfg, progress=False)
    return records(tmp_path / "inprocess")


# ------------------------------------------------------------------------------------------------ run config
def test_pyproject_declares_the_apps_and_every_config_field() -> None:
    run_config = pyproject_run_config()
    scalar = {f.name for f in fields(FedConfig) if not isinstance(getattr(FedConfig(), f.name), dict)}
    declared = {key.split(".")[0].replace("-", "_") for key in run_config}
    assert declared == scalar | {"dataset_options", "topology_options", "optimizer_options", "round_timeout",
                                 "node_wait"}
    # the defaults of `flwr run .` are those of `samsuite fed run`, on the Flower engine
    assert fed_config_from_run_config(run_config) == FedConfig(engine="flower")
    assert relay_seconds(run_config, "round-timeout") == 3600.0 and relay_seconds(run_config, "node-wait") == 120.0


def test_run_config_keys_map_onto_the_config() -> None:
    run_config = {**pyproject_run_config(), "num-nodes": 6, "topology": "random-k", "topology-options.k": 2,
                  "local-steps": 3, "momentum": "", "gossip-steps": 2, "algorithm": "dfedsam-mgs",
                  "optimizer": "gsam", "optimizer-options.alpha": 0.2, "rho": 1, "round-timeout": 5}
    cfg = fed_config_from_run_config(run_config)
    assert (cfg.num_nodes, cfg.topology, cfg.local_steps, cfg.q, cfg.optimizer_name) == (6, "random-k", 3, 2, "gsam")
    assert cfg.topology_options == {"k": 2} and cfg.optimizer_options == {"alpha": 0.2}  # "" options stay unset
    assert cfg.momentum is None and cfg.local_epochs is None and cfg.name is not None  # "" = null
    assert cfg.rho == 1.0 and isinstance(cfg.rho, float)
    assert relay_seconds(run_config, "round-timeout") == 5.0


@pytest.mark.parametrize(("run_config", "field"), [
    ({"num-nodez": 4}, "num_nodez"),
    ({"rounds": 0}, "rounds"),
    ({"algorithm": "dfedsgd"}, "algorithm"),
    ({"topology-options.q": 3}, "topology.q"),
])
def test_bad_run_config_names_the_field(run_config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        fed_config_from_run_config(run_config)


@pytest.mark.parametrize("key", ["round-timeout", "node-wait"])
@pytest.mark.parametrize("value", [0, -1.0, "soon", True])
def test_bad_relay_seconds(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        relay_seconds({key: value}, key)


# ------------------------------------------------------------------------------------------------ ClientApp
def test_train_handler_returns_the_local_update(tmp_path: Path) -> None:
    """The `flwr run` ClientApp on a hand-built Message: config from the Context's run config,
    reply = local_update's y_i and metrics, addressed back to the sender."""
    run_config = {**pyproject_run_config(), **small(), "out-dir": str(tmp_path)}
    cfg = fed_config_from_run_config(run_config)
    data = federated_data(cfg)
    x = {k: v + 0.01 for k, v in initial_state(cfg, data).items()}
    msg = Message(RecordDict({"arrays": ArrayRecord(x), "config": ConfigRecord({"node": 2, "round": 1})}),
                  dst_node_id=42, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m-1"
    context = Context(run_id=1, node_id=42, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config=run_config)
    reply = client_module.app(msg, context)
    assert not reply.has_error() and reply.metadata.reply_to_message_id == "m-1" and reply.metadata.dst_node_id == 0
    want_y, want_metrics = local_update(x, 2, 1, cfg, data)
    got_y = reply.content["arrays"].to_torch_state_dict()
    assert list(got_y) == list(want_y)
    for key in want_y:
        assert torch.equal(got_y[key], want_y[key]), key
    assert not torch.equal(got_y["head.weight"], x["head.weight"])  # it trained
    got_metrics = dict(reply.content["metrics"])  # Flower's metric key num-examples, and the process's age
    assert set(got_metrics) == set(want_metrics) - {"num_examples"} | {"num-examples", "process_s"}
    assert got_metrics["num-examples"] == want_metrics["num_examples"] and got_metrics["process_s"] > 0
    for key in set(want_metrics) - TIMING - {"num_examples"}:
        assert got_metrics[key] == want_metrics[key], key

    msg = Message(RecordDict({"arrays": ArrayRecord(x), "config": ConfigRecord({"node": 1, "round": 1})}),
                  dst_node_id=42, message_type=MessageType.TRAIN)  # node 1 is partition-id 1's
    with pytest.raises(ConfigError, match=r"this SuperNode serves nodes \[0, 2\], not node 1"):
        client_module.app(msg, context)


# ------------------------------------------------------------------------------------------------ ServerApp
@pytest.mark.parametrize("supernodes", [NODES, 3])
def test_relay_gives_the_inprocess_metrics(tmp_path: Path, supernodes: int) -> None:
    """`flwr run`'s apps (config from the run config) through a grid of `supernodes`: the metrics
    of the in-process engine; node i runs on the SuperNode whose partition-id is i mod S, which
    the relay learned from one query per SuperNode."""
    run_config = {**pyproject_run_config(), **small(), "out-dir": str(tmp_path / "flower"), "name": "relay"}
    grid = LocalGrid(client_module.app, supernodes, run_config)
    server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    got = records(tmp_path / "flower" / "relay")
    want = inprocess_records(tmp_path, run_config)
    assert_same_metrics(got, want)
    assert want[-1]["consensus_distance"] > 0 and want[-1]["live"] == NODES
    assert sorted(grid.delivered) == sorted((grid.ids[i % supernodes], i, r) for r in range(2) for i in range(NODES))
    assert sorted(grid.queried) == sorted(grid.ids)  # one query per SuperNode
    log = [json.loads(line) for line in (tmp_path / "flower" / "relay" / "messages.jsonl").read_text().splitlines()]
    assert [(m["round"], m["node"], m["status"]) for m in log] == [(r, i, "ok") for r in (1, 2) for i in range(NODES)]
    assert all(m["compute_s"] > 0 and m["process_s"] > 0 for m in log)
    summary = json.loads((tmp_path / "flower" / "relay" / "summary.json").read_text())
    assert summary["config"]["engine"] == "flower" and summary["final"]["round"] == 2


class CarryingGrid(LocalGrid):
    """A LocalGrid that notes, per (round, node), whether the task message carried a member state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.carried: dict[tuple[int, int], bool] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            task = msg.content["config"]
            if msg.metadata.message_type == MessageType.TRAIN:
                self.carried[(int(task["round"]), int(task["node"]))] = MEMBER_KEY in msg.content
        return super().send_and_receive(messages, timeout=timeout)


def test_relay_carries_the_member_state_and_gives_the_inprocess_metrics(tmp_path: Path) -> None:
    """optimizer=saf, its term on from an example's second visit: the relay sends each node its
    buffer from round 2 on (nothing in round 1, when it has none) and gets the metrics of the
    in-process engine, which depend on the buffer having come back."""
    run_config = {**pyproject_run_config(), **small(), "local-steps": "", "local-epochs": 1, "optimizer": "saf",
                  "optimizer-options.past": 1, "optimizer-options.start-epoch": 1,
                  "out-dir": str(tmp_path / "flower"), "name": "saf"}
    grid = CarryingGrid(client_module.app, NODES, run_config)
    server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    assert grid.carried == {(r, i): r > 0 for r in range(2) for i in range(NODES)}
    assert_same_metrics(records(tmp_path / "flower" / "saf"), inprocess_records(tmp_path, run_config))


@pytest.mark.parametrize("failure", ["error", "silent"])
def test_a_failed_node_is_dropped_from_mixing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """Node 1 raises (an error reply) or never answers (a timeout) in round 0: the round mixes
    the other three only, exactly as FedRun does for failed=[1], and the run goes on."""
    cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path), "name": "flower"})
    silent: list[tuple[int, int]] = []
    if failure == "error":
        def flaky(state: Any, node: int, round_idx: int, *args: Any, **kwargs: Any) -> Any:
            if (node, round_idx) == (1, 0):
                raise RuntimeError("injected failure")
            return local_update(state, node, round_idx, *args, **kwargs)

        monkeypatch.setattr(client_module, "local_update", flaky)
    else:
        silent.append((1, 0))
    summaries: list[dict[str, Any]] = []
    server = build_server_app(cfg, timeout_s=1.0, on_summary=summaries.append)
    server(grid=LocalGrid(build_client_app(cfg), NODES, silent=silent), context=Context(1, 0, {}, RecordDict(), {}))
    got = records(tmp_path / "flower")
    assert [r["failed"] for r in got] == [[1], []] and [r["live"] for r in got] == [NODES - 1, NODES]
    assert summaries and summaries[0]["final"]["round"] == 2

    ref_cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path), "name": "reference"})
    run = FedRun(ref_cfg, progress=False)
    for r in range(2):
        updates = {i: local_update(x, i, r, ref_cfg, run.data) for i, x in run.round_tasks(r) if (i, r) != (1, 0)}
        run.finish_round(r, updates, failed=[1] if r == 0 else [])
    assert_same_metrics(got, records(tmp_path / "reference"))


def test_a_round_without_any_update_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node failing is a broken ClientApp, not bad luck: the relay stops with the first error."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken ClientApp")

    monkeypatch.setattr(client_module, "local_update", broken)
    cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="round 1: none of the 4 nodes returned an update; node 0: .*broken"):
        build_server_app(cfg, timeout_s=1.0)(grid=LocalGrid(build_client_app(cfg), NODES),
                                              context=Context(1, 0, {}, RecordDict(), {}))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"device": "cuda"}, "device"),
    ({"num_supernodes": 0}, "num_supernodes"),
    ({"cpus_per_client": 0}, "cpus_per_client"),
])
def test_run_flower_rejects_bad_settings_before_starting(kwargs: dict[str, Any], field: str) -> None:
    cfg = FedConfig(num_nodes=NODES)
    cfg.device = kwargs.pop("device", "auto")  # set after the checks: "cuda" is refused there on a CPU machine
    with pytest.raises(ConfigError, match=field):
        run_flower(cfg, **kwargs)


def test_the_relay_passes_its_error_on(tmp_path: Path) -> None:
    """A diverged run stops the ServerApp with the run's own error (Flower would only log it)."""
    errors: list[BaseException] = []
    cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path), "lr": 50.0, "max-loss": 1.0})
    server = build_server_app(cfg, timeout_s=30.0, on_error=errors.append)
    with pytest.raises(Diverged, match="round 1: the loss diverged"):
        server(grid=LocalGrid(build_client_app(cfg), NODES), context=Context(1, 0, {}, RecordDict(), {}))
    assert len(errors) == 1 and isinstance(errors[0], Diverged)


# ------------------------------------------------------------------------------------------------ slow: Ray, flwr run
@pytest.mark.slow
def test_flower_simulation_stops_a_diverged_run_with_its_error(tmp_path: Path) -> None:
    cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path), "lr": 50.0, "max-loss": 1.0})
    with pytest.raises(Diverged, match="round 1: the loss diverged"):
        run_flower(cfg, progress=False)


@pytest.mark.slow
def test_flower_simulation_gives_the_inprocess_metrics(tmp_path: Path) -> None:
    """`run_flower` (Flower's Ray simulation engine, ClientApps in other processes) and
    `run_inprocess` on the same config and seed: the same metrics."""
    run_config = {**small(), "out-dir": str(tmp_path), "name": "flower"}
    summary = run_flower(fed_config_from_run_config(run_config), progress=False)
    got = records(tmp_path / "flower")
    assert summary["final"] == got[-1]
    assert_same_metrics(got, inprocess_records(tmp_path, run_config))


def _superlinks_of(flwr_home: Path) -> list[int]:
    """Pids of the SuperLinks that log into `flwr_home` (started by this test's `flwr run`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        ours = any(b"flower-superlink" in c for c in cmd) and any(str(flwr_home).encode() in c for c in cmd)
        if proc.name.isdigit() and ours:
            pids.append(int(proc.name))
    return pids


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (its SuperExec), read from /proc."""
    kids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None or not Path("/proc").is_dir(), reason="needs the flwr CLI and /proc")
def test_flwr_run_runs_the_app(tmp_path: Path) -> None:
    """`flwr run .` in this environment (runtime dependency installation off, a private FLWR_HOME
    and ports): a 3-node, 2-round run whose metrics.jsonl the relay wrote; then the SuperLink and
    SuperExec it left running in the background are stopped."""
    flwr_home = tmp_path / "flwr_home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    out = tmp_path / "runs"
    run_config = f"num-nodes=3 rounds=2 local-steps=2 partitioner='iid' out-dir='{out}' name='flwr-run'"
    cmd = ["flwr", "run", str(ROOT), "--stream", "--federation-config", "num-supernodes=3", "--run-config", run_config]
    try:
        proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log
        got = records(out / "flwr-run")
        assert [r["round"] for r in got] == [1, 2], log
        assert all(r["live"] == 3 and math.isfinite(r["test_acc"]) for r in got)
        assert "Installing application dependencies" not in log
        summary = json.loads((out / "flwr-run" / "summary.json").read_text())
        assert summary["config"]["engine"] == "flower" and summary["config"]["num_nodes"] == 3
    finally:
        for pid in _superlinks_of(flwr_home):
            kids = _children(pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in [pid, *kids]):
                time.sleep(0.2)
    assert not _superlinks_of(flwr_home)


# ------------------------------------------------------------------------------------------------ SuperNodes' own nodes
@pytest.mark.parametrize(("node_config", "want"), [
    ({"partition-id": 1, "num-partitions": 3}, [1, 4, 7]),
    ({"partition-id": 0, "num-partitions": 1}, list(range(8))),
    ({"partition-id": 9, "num-partitions": 10}, []),  # more SuperNodes than nodes: this one serves none
    ({"nodes": "0,3,5-7", "partition-id": 0, "num-partitions": 2}, [0, 3, 5, 6, 7]),  # an explicit list wins
    ({"nodes": 4}, [4]),
    ({"nodes": " 2 , 2,1 "}, [1, 2]),
])
def test_served_nodes_follow_the_node_config(node_config: dict[str, Any], want: list[int]) -> None:
    assert served_nodes(node_config, 8) == want


@pytest.mark.parametrize(("node_config", "match"), [
    ({}, "node-config: name the nodes this SuperNode serves: partition-id=K num-partitions=S"),
    ({"partition-id": 3, "num-partitions": 3}, r"0 <= partition-id < num-partitions; got partition-id=3"),
    ({"partition-id": "0", "num-partitions": 2}, "expected integers"),
    ({"num-partitions": 2}, "partition-id=None"),
    ({"nodes": "0,x"}, r"nodes='0,x': expected node ids such as '0,3,5-7' \(bad part x\)"),
    ({"nodes": "2-9"}, r"nodes \[8, 9\] are outside the run's num-nodes=8"),
])
def test_a_bad_node_config_names_the_key(node_config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        served_nodes(node_config, 8)


def replay(tmp_path: Path, run_config: dict[str, Any], failed: dict[int, list[int]]) -> list[dict[str, Any]]:
    """The in-process engine's records with node failures `failed` {round: nodes}."""
    cfg = fed_config_from_run_config({**run_config, "out-dir": str(tmp_path), "name": "replay"})
    with FedRun(cfg, progress=False) as run:
        for r in range(cfg.rounds):
            updates = {i: local_update(x, i, r, cfg, run.data) for i, x in run.round_tasks(r)
                       if i not in failed.get(r, [])}
            run.finish_round(r, updates, failed=failed.get(r, []))
    return records(tmp_path / "replay")


def test_supernodes_train_from_their_exported_partitions(tmp_path: Path) -> None:
    """node-config partition-dir: each SuperNode reads only its nodes' files (the others are
    deleted), and the run has the in-process engine's metrics."""
    run_config = {**pyproject_run_config(), **small(), "out-dir": str(tmp_path / "flower"), "name": "parts"}
    cfg = fed_config_from_run_config(run_config)
    export_partitions(cfg, tmp_path / "parts")
    grid = LocalGrid(client_module.app, 2, run_config, node_config={"partition-dir": str(tmp_path / "parts")})
    data = client_module.served_data(cfg, grid.contexts[grid.ids[0]].node_config, run_config)[1]
    assert sorted(data.nodes) == [0, 2] and len(data.test_y) == 0  # SuperNode 0 holds nodes 0 and 2 only
    server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    assert_same_metrics(records(tmp_path / "flower" / "parts"), inprocess_records(tmp_path, run_config))


def test_a_gone_supernodes_nodes_fail_and_are_never_rerouted(tmp_path: Path) -> None:
    """SuperNode 1 (nodes 1 and 3) leaves after round 1: its nodes fail in rounds 2 and 3, no
    message of theirs goes to SuperNode 0, and the metrics equal an in-process replay of those failures."""
    run_config = {**pyproject_run_config(), **small(rounds=3), "out-dir": str(tmp_path / "flower"), "name": "gone"}
    grid = LocalGrid(client_module.app, 2, run_config, gone={1: 0})
    server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    got = records(tmp_path / "flower" / "gone")
    assert [r["failed"] for r in got] == [[], [1, 3], [1, 3]]
    assert {(sn, i) for sn, i, _ in grid.delivered} == {(grid.ids[0], 0), (grid.ids[0], 2), (grid.ids[1], 1),
                                                        (grid.ids[1], 3)}
    assert_same_metrics(got, replay(tmp_path, run_config, {1: [1, 3], 2: [1, 3]}))
    log = [json.loads(line) for line in (tmp_path / "flower" / "gone" / "messages.jsonl").read_text().splitlines()]
    assert [m["status"] for m in log if m["node"] == 3] == ["ok", "unserved", "unserved"]


def test_unclaimed_nodes_fail_every_round(tmp_path: Path) -> None:
    """Two SuperNodes of num-partitions=4 serve nodes 0 and 1 only: after node-wait, nodes 2 and 3 fail."""
    run_config = {**pyproject_run_config(), **small(), "out-dir": str(tmp_path / "flower"), "name": "half",
                  "node-wait": 0.01}
    grid = LocalGrid(client_module.app, 2, run_config, node_config={"num-partitions": 4})
    server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    got = records(tmp_path / "flower" / "half")
    assert [r["failed"] for r in got] == [[2, 3], [2, 3]]
    assert_same_metrics(got, replay(tmp_path, run_config, {0: [2, 3], 1: [2, 3]}))


@pytest.mark.parametrize(("node_config", "match"), [
    ({"nodes": "0-3"}, r"SuperNode \d+ claims nodes \[0, 1, 2, 3\] that SuperNode\(s\) \[\d+\] already serve"),
    ({"partition-dir": "PARTS"}, r"could not say which nodes it serves: .*another split \(seed: exported 1, run 0"),
    ({"partition-id": ""}, r"could not say which nodes it serves: .*expected integers"),
])
def test_a_misconfigured_supernode_stops_the_run_at_the_start(tmp_path: Path, node_config: dict[str, Any],
                                                             match: str) -> None:
    run_config = {**pyproject_run_config(), **small(), "out-dir": str(tmp_path / "flower"), "name": "bad"}
    if "partition-dir" in node_config:  # partitions of another seed
        export_partitions(fed_config_from_run_config({**run_config, "seed": 1}), tmp_path / "parts")
        node_config = {"partition-dir": str(tmp_path / "parts")}
    grid = LocalGrid(client_module.app, 2, run_config, node_config=node_config)
    with pytest.raises(RunError, match=match):
        server_module.app(grid=grid, context=Context(1, 0, {}, RecordDict(), run_config))
    assert grid.delivered == []  # no training started


def test_a_round_timeout_below_the_cold_start_says_so(tmp_path: Path) -> None:
    """Every reply missing (round-timeout shorter than a ClientApp's start-up) stops the run with a hint."""
    cfg = fed_config_from_run_config({**small(), "out-dir": str(tmp_path)})
    silent = [(i, 0) for i in range(NODES)]
    with pytest.raises(RunError, match=r"none of the 4 nodes returned an update; a SuperNode runs its messages one "
                                       r"after another.*round-timeout must exceed"):
        build_server_app(cfg, timeout_s=1.0)(grid=LocalGrid(build_client_app(cfg), NODES, silent=silent),
                                              context=Context(1, 0, {}, RecordDict(), {}))


def test_the_fab_metadata_is_flowers_current_format() -> None:
    """fab-format-version 1: a license file in the FAB, flwr in [project].dependencies with a lower
    bound, a target version; what `flwr build` validates."""
    from flwr.supercore.fab_format_version import normalize_and_validate_fab_format

    config, _ = load_and_validate(ROOT / "pyproject.toml")
    meta = normalize_and_validate_fab_format(config)
    assert (meta.fab_format_version, meta.flwr_version_min) == (1, "1.26")
    assert "LICENSE" in config["tool"]["flwr"]["app"]["fab-include"] and (ROOT / "LICENSE").is_file()
    deps = " ".join(config["project"]["dependencies"])
    assert "flwr>=" in deps and "flwr-datasets" in deps  # what a Flower-provisioned SuperNode installs
