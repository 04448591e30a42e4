"""The Flower app: a ServerApp that acts as the gossip relay and a ClientApp that trains one node.

Flower connects one ServerApp with many ClientApps in a star; decentralized FL has no server. The
ServerApp therefore plays the peer-to-peer network (`fedsam.run.FedRun`): every round it sends
each node its own model x_i, collects the locally trained y_i and mixes them with W (W^Q for
DFedSAM-MGS), as the nodes would by exchanging models with their neighbours. The ClientApp's
`train` handler is as thin as Flower's quickstart-pytorch: unpack the message, call
`fedsam.client.local_update` (the same function the in-process engine calls), pack the reply.

Messages: ServerApp -> node i: `train` with {"arrays": ArrayRecord(x_i), "config": ConfigRecord(
node=i, round=r)}; reply: {"arrays": ArrayRecord(y_i), "metrics": MetricRecord(train_loss,
num_examples, num_steps, compute_s)}. Both also carry "member": ArrayRecord(the node's member
state, flattened by `fedsam.client.flatten_member_state`) when it is not empty (local optimizers
with state of their own, such as SAF's buffer): a logical node may run on another supernode
each round, so the relay keeps it between rounds in the node's stead; it belongs to the node
and is not counted as communication. Node indices are logical: node i runs on the i-th
supernode (node ids sorted), round robin when there are fewer supernodes than nodes, so a
federation of any size runs any `num_nodes`. An error reply or no reply within `round-timeout` seconds marks
the node as failed: it keeps its model and is left out of that round's mixing.

Run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run . --run-config "k=v ..."`):
every key is a `FedConfig` field in kebab-case (`num-nodes` -> num_nodes); a nested key fills a
mapping field (`topology-options.k` -> topology_options["k"]); the empty string means null (the
field's default None, or an unset option); `round-timeout` (seconds) is the relay's own key.

Two ways to run it: `flwr run .` (pyproject.toml's components below) and `run_flower(cfg)`, which
runs the same apps in this process with `flwr.simulation.run_simulation` (`samsuite fed run
engine=flower`).
"""

from __future__ import annotations

import functools
import logging
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsam.client import MemberState, federated_data, flatten_member_state, local_update, unflatten_member_state
from fedsam.config import FedConfig
from fedsam.run import FedRun
from shared.config import ConfigError, from_dict
from shared.errors import RunError

ROUND_TIMEOUT_KEY = "round-timeout"
DEFAULT_ROUND_TIMEOUT_S = 3600.0  # as Flower's strategies: generous, a hung node only delays a round
NODE_WAIT_S = 120.0  # how long the ServerApp waits for the first supernode to connect
NODE_SETTLE_S = 2.0  # ... then for more to join, unless every node already has its own supernode
POLL_S = 0.05
NULL = ""  # TOML has no null: the empty string stands for None in the run config
MEMBER_KEY = "member"  # the message entry of a node's member state (absent when it is empty)

log = logging.getLogger("flwr")  # Flower's logger: its handler shows the ServerApp's lines in `flwr run --stream`


# ---------------------------------------------------------------------------------------------- run config
def _optional_fields() -> set[str]:
    hints = typing.get_type_hints(FedConfig)
    return {f.name for f in fields(FedConfig) if type(None) in typing.get_args(hints[f.name])}


def fed_config_from_run_config(run_config: Mapping[str, Any]) -> FedConfig:
    """The `FedConfig` of a Flower run config (flat, kebab-case, "" for null; see the module
    docstring), validated by `shared.config.from_dict`: a bad key or value is a ConfigError."""
    optional = _optional_fields()
    data: dict[str, Any] = {}
    for key, value in run_config.items():
        if key == ROUND_TIMEOUT_KEY:
            continue
        name, *option = [part.replace("-", "_") for part in key.split(".")]
        if option:  # a mapping field such as topology_options: "" leaves the option unset
            if value != NULL:
                data.setdefault(name, {})[".".join(option)] = value
            else:
                data.setdefault(name, {})
        else:
            data[name] = None if value == NULL and name in optional else value
    try:
        return from_dict(FedConfig, data)
    except ConfigError as err:
        raise ConfigError(f"Flower run config: {err} (keys are the fields in kebab-case, e.g. num-nodes)") from None


def round_timeout(run_config: Mapping[str, Any]) -> float:
    """Seconds the relay waits for a round's replies (`round-timeout`, default 3600)."""
    value = run_config.get(ROUND_TIMEOUT_KEY, DEFAULT_ROUND_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{ROUND_TIMEOUT_KEY}: expected a number of seconds > 0, got {value!r}")
    return float(value)


@functools.lru_cache(maxsize=4)
def _cached_config(items: tuple[tuple[str, Any], ...]) -> FedConfig:
    return fed_config_from_run_config(dict(items))


def _context_config(context: Context) -> FedConfig:
    """A ClientApp worker sees the same run config for every message: parse and validate it once."""
    return _cached_config(tuple(sorted(context.run_config.items())))


# ---------------------------------------------------------------------------------------------- messages
def message_content(records: dict[str, Any], member_state: MemberState) -> RecordDict:
    """A message's records, plus the member state (flattened) when there is one: runs whose
    optimizer keeps none send exactly what they did before."""
    if member_state:
        records = {**records, MEMBER_KEY: ArrayRecord(flatten_member_state(member_state))}
    return RecordDict(records)


def message_member_state(content: RecordDict) -> MemberState:
    """The member state a message carries ({} when it has none)."""
    return unflatten_member_state(content[MEMBER_KEY].to_torch_state_dict()) if MEMBER_KEY in content else {}


# ---------------------------------------------------------------------------------------------- ClientApp
def train_node(msg: Message, cfg: FedConfig) -> Message:
    """The ClientApp's work for one message: node i's local update from the x_i (and member
    state) it was sent; the reply carries y_i and the new member state."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = msg.content["config"]
    state = msg.content["arrays"].to_torch_state_dict()
    y, metrics, member = local_update(state, int(task["node"]), int(task["round"]), cfg, federated_data(cfg),
                                      member_state=message_member_state(msg.content))
    content = message_content({"arrays": ArrayRecord(y), "metrics": MetricRecord(metrics)}, member)
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------------- ServerApp
def wait_for_nodes(grid: Grid, wanted: int, *, timeout_s: float = NODE_WAIT_S, settle_s: float = NODE_SETTLE_S
                   ) -> list[int]:
    """The connected supernodes (sorted ids): wait for the first, then until `wanted` are there or
    no more joined for `settle_s` (the ServerApp is not told the federation's size)."""
    start = time.monotonic()
    ids = sorted(grid.get_node_ids())
    while not ids:
        if time.monotonic() - start > timeout_s:
            raise RunError(f"no Flower supernode connected within {timeout_s:.0f} s")
        time.sleep(POLL_S)
        ids = sorted(grid.get_node_ids())
    changed = time.monotonic()
    while len(ids) < wanted and time.monotonic() - changed < settle_s:
        time.sleep(POLL_S)
        now = sorted(grid.get_node_ids())
        if now != ids:
            ids, changed = now, time.monotonic()
    return ids


def relay_round(grid: Grid, run: FedRun, r: int, supernodes: list[int], timeout_s: float) -> dict[str, Any]:
    """One round through Flower: send node i its x_i and member state (on supernode i mod S),
    collect the y_i and new member states, mark error and missing replies as failed, mix.
    Returns the round's record."""
    messages: dict[int, Message] = {}
    for node, state in run.round_tasks(r):
        content = message_content({"arrays": ArrayRecord(state), "config": ConfigRecord({"node": node, "round": r})},
                                    run.member_state[node])
        dst = supernodes[node % len(supernodes)]
        messages[node] = Message(content, dst_node_id=dst, message_type=MessageType.TRAIN, group_id=str(r))
    replies = list(grid.send_and_receive(list(messages.values()), timeout=timeout_s))
    node_of = {msg.metadata.message_id: node for node, msg in messages.items()}  # ids are set when sent
    updates: dict[int, tuple[dict[str, torch.Tensor], dict[str, float], MemberState]] = {}
    errors: dict[int, str] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is None or node in updates or node in errors:
            continue  # not an answer to this round's messages
        if reply.has_error():
            errors[node] = (reply.error.reason.strip().splitlines() or [""])[-1]
            log.warning("round %d: node %d failed (error %d: %s)", r + 1, node, reply.error.code, errors[node])
        else:
            updates[node] = (reply.content["arrays"].to_torch_state_dict(), dict(reply.content["metrics"]),
                             message_member_state(reply.content))
    missing = sorted(set(messages) - set(updates) - set(errors))
    if missing:
        log.warning("round %d: no reply within %.0f s from nodes %s", r + 1, timeout_s, missing)
    if messages and not updates:  # a broken ClientApp, not bad luck: stop instead of "training" without updates
        first = f"; node {min(errors)}: {errors[min(errors)]}" if errors else ""
        raise RunError(f"round {r + 1}: none of the {len(messages)} nodes returned an update{first}")
    return run.finish_round(r, updates, failed=sorted([*errors, *missing]))


def relay(grid: Grid, run: FedRun, *, timeout_s: float = DEFAULT_ROUND_TIMEOUT_S, supernodes: int | None = None
          ) -> dict[str, Any]:
    """Drive `run` from its start (or resume) round to the end through `grid`; returns the summary.
    `supernodes`: how many to wait for (default: one per node)."""
    wanted = min(run.num_nodes, supernodes or run.num_nodes)
    ids = wait_for_nodes(grid, wanted)
    log.info("gossip relay: %d nodes on %d supernodes, run folder %s", run.num_nodes, len(ids), run.run.path.resolve())
    for r in range(run.start_round, run.rounds):
        ids = sorted(grid.get_node_ids()) or wait_for_nodes(grid, wanted)  # supernodes may come and go
        record = relay_round(grid, run, r, ids, timeout_s)
        log.info("round %d/%d: test_acc %s, consensus %.4g, train_loss %s, failed %s", record["round"], run.rounds,
                 record["test_acc"], record["consensus_distance"], record["train_loss"], record["failed"])
    return run.finish()


# ---------------------------------------------------------------------------------------------- the apps
def build_apps(
    cfg: FedConfig | None = None,
    *,
    progress: bool = False,
    timeout_s: float | None = None,
    supernodes: int | None = None,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> tuple[ServerApp, ClientApp]:
    """A ServerApp (gossip relay) and a ClientApp (local update) for `cfg`, or, with cfg None (as
    `flwr run .` loads them), for the config and `round-timeout` of the Flower run config.
    `on_summary` receives the run's summary when the ServerApp finishes, `on_error` the error that
    stopped it (a diverged run, a refused run folder), which Flower itself only logs."""
    server_app, client_app = ServerApp(), ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_node(msg, cfg if cfg is not None else _context_config(context))

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else fed_config_from_run_config(context.run_config)
        timeout = timeout_s if timeout_s is not None else round_timeout(context.run_config)
        try:
            with FedRun(run_cfg, progress=progress) as run:
                summary = relay(grid, run, timeout_s=timeout, supernodes=supernodes)
        except Exception as err:
            if on_error is not None:
                on_error(err)
            raise
        if on_summary is not None:
            on_summary(summary)

    return server_app, client_app


# The components pyproject.toml names for `flwr run .`; two plain assignments, because flwr finds
# them by reading this file's syntax tree (an unpacking assignment is not recognised).
_FLWR_RUN_APPS = build_apps()
server_app = _FLWR_RUN_APPS[0]
client_app = _FLWR_RUN_APPS[1]


def run_flower(
    cfg: FedConfig,
    *,
    progress: bool = True,
    num_supernodes: int | None = None,
    cpus_per_client: float = 1.0,
    timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
) -> dict[str, Any]:
    """Run (or resume) `cfg` in Flower's simulation engine (Ray), in this process, with the same
    apps as `flwr run .`; returns the summary. One supernode per node by default; Ray runs
    (CPUs / cpus_per_client) ClientApps at a time, on CPU."""
    if num_supernodes is None:
        num_supernodes = cfg.num_nodes
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ConfigError(f"num_supernodes: expected an integer >= 1, got {num_supernodes!r}")
    if not cpus_per_client > 0:
        raise ConfigError(f"cpus_per_client: expected a number > 0, got {cpus_per_client!r}")
    if cfg.device not in ("auto", "cpu"):  # Ray hides the GPUs from actors that reserve none
        raise ConfigError(f"device: engine=flower trains its ClientApps on CPU; got device={cfg.device!r}. "
                          "Use device=auto or cpu, or engine=inprocess to train on a GPU")
    from flwr.simulation import run_simulation  # imports Ray: only when a simulation really runs

    summaries: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    server, client = build_apps(cfg, progress=progress, timeout_s=timeout_s, supernodes=num_supernodes,
                                on_summary=summaries.append, on_error=errors.append)
    backend_config = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}}
    run_simulation(server_app=server, client_app=client, num_supernodes=num_supernodes,
                   backend_config=backend_config)  # type: ignore[arg-type]
    if errors:
        raise errors[0]
    if not summaries:
        raise RunError("the Flower simulation ended before the ServerApp finished its run (see Flower's log above)")
    return summaries[0]

