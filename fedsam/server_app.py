"""The ServerApp: the gossip relay, and `run_flower`, which runs both apps in Flower's simulation.

Flower connects one ServerApp with many ClientApps in a star; decentralized FL has no server. The
ServerApp therefore plays the peer-to-peer network (`fedsam.run.FedRun`): every round it sends
each node its own model x_i, collects the locally trained y_i and mixes them with W (W^Q for
DFedSAM-MGS), as the nodes would by exchanging models with their neighbours.

Which SuperNode serves which logical node is the SuperNodes' own choice (their node-config,
`fedsam.messages`): at the start the relay sends every connected SuperNode one `query` message
and learns the nodes it serves and their data fingerprints, which must match the relay's split.
It waits up to `node-wait` seconds for every node to be claimed. A SuperNode that joins later (a
restarted one) is asked the same way. Node i's task goes to its own SuperNode only: when that
SuperNode is gone, or answers with an error, or not within `round-timeout` seconds, node i fails
that round (it keeps its model and is left out of the mixing), exactly as a failure of the
in-process engine; it is never re-routed to a SuperNode that does not hold its data.

Each message's timing goes to <run>/messages.jsonl (round, node, supernode, status, compute_s,
process_s: the ClientApp process's age at its reply, round_trip_s): where a deployment's time goes.
Members that keep state of their own (SAF's buffer) send it with the task and the reply; the
relay keeps it between rounds in the node's stead (it belongs to the node, not counted as
communication).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedsam.client_app import build_client_app
from fedsam.config import FedConfig
from fedsam.messages import (
    NODE_WAIT_KEY,
    RELAY_KEYS,
    ROUND_TIMEOUT_KEY,
    fed_config_from_run_config,
    from_flower_metrics,
    message_content,
    message_member_state,
    relay_seconds,
)
from fedsam.partitions import fingerprint
from fedsam.run import FedRun
from shared.config import ConfigError
from shared.errors import RunError

POLL_S = 1.0  # how often the relay looks for SuperNodes while it waits for them (as Flower's strategies)
MESSAGES = "messages.jsonl"
TIMEOUT_HINT = ("a SuperNode runs its messages one after another, each in a fresh process (seconds of start-up: "
                "process_s in messages.jsonl), so round-timeout must exceed the nodes per SuperNode x that time")

log = logging.getLogger("flwr")  # Flower's logger: its handler shows the ServerApp's lines in `flwr run --stream`


def _reason(reply: Message) -> str:
    return (reply.error.reason.strip().splitlines() or [""])[-1]


class Directory:
    """Which SuperNode serves each logical node, as the SuperNodes said in their query replies."""

    def __init__(self, run: FedRun) -> None:
        self.fingerprints = [fingerprint(run.data.nodes[i]) for i in range(run.num_nodes)]
        self.owner: dict[int, int] = {}  # node -> SuperNode id
        self.asked: set[int] = set()  # SuperNodes queried (each once)

    def unclaimed(self) -> list[int]:
        return [i for i in range(len(self.fingerprints)) if i not in self.owner]

    def ask(self, grid: Grid, connected: set[int], timeout_s: float, *, strict: bool) -> None:
        """Query the connected SuperNodes not asked yet and record their nodes. `strict` (the
        start): a SuperNode's error or wrong data stops the run; later it is logged and ignored."""
        new = sorted(connected - self.asked)
        if not new:
            return
        self.asked.update(new)
        queries = [Message(message_content({"config": ConfigRecord({})}, {}), dst_node_id=sn,
                           message_type=MessageType.QUERY, ttl=timeout_s) for sn in new]
        replies = list(grid.send_and_receive(queries, timeout=timeout_s))
        sent = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in queries}  # ids are set when sent
        for reply in replies:
            supernode = sent.get(reply.metadata.reply_to_message_id)
            if supernode is None:
                continue
            try:
                self._claim(supernode, reply, connected)
            except RunError as err:
                if strict:
                    raise
                log.warning("%s; its nodes stay unserved", err)

    def _claim(self, supernode: int, reply: Message, connected: set[int]) -> None:
        if reply.has_error():
            raise RunError(f"SuperNode {supernode} could not say which nodes it serves: {_reason(reply)}")
        record = reply.content["config"]
        nodes, prints = [int(i) for i in record["nodes"]], list(record["fingerprints"])
        wrong = [i for i, fp in zip(nodes, prints) if fp != self.fingerprints[i]]
        if wrong:
            raise RunError(f"SuperNode {supernode} holds other data for nodes {wrong} than the relay's split "
                           "(export the partitions again with the run's settings)")
        taken = {i: self.owner[i] for i in nodes if i in self.owner and self.owner[i] in connected}
        if taken:
            raise RunError(f"SuperNode {supernode} claims nodes {sorted(taken)} that SuperNode(s) "
                           f"{sorted(set(taken.values()))} already serve; check their --node-config")
        self.owner.update(dict.fromkeys(nodes, supernode))
        log.info("SuperNode %d serves nodes %s (data checked; %.1f s)", supernode, _ranges(nodes),
                 float(record.get("query_s", float("nan"))))


def _ranges(nodes: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for i in sorted(nodes):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "none"


def discover(grid: Grid, directory: Directory, *, wait_s: float, timeout_s: float) -> None:
    """Ask SuperNodes as they connect until every node is claimed or `wait_s` has passed."""
    start = time.monotonic()
    while True:
        directory.ask(grid, set(grid.get_node_ids()), timeout_s, strict=True)
        if not directory.unclaimed() or time.monotonic() - start > wait_s:
            break
        time.sleep(POLL_S)
    missing = directory.unclaimed()
    if len(missing) == len(directory.fingerprints):
        raise RunError(f"no SuperNode claimed a node within {NODE_WAIT_KEY}={wait_s:.0f} s "
                       f"({len(directory.asked)} connected)")
    if missing:
        log.warning("nodes %s have no SuperNode after %.0f s: they fail every round until one serves them",
                    _ranges(missing), wait_s)


def relay_round(grid: Grid, run: FedRun, r: int, directory: Directory, timeout_s: float
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One round through Flower: node i's x_i (and member state) to its SuperNode, the y_i back;
    error, missing and unserved replies are failures. Returns (the round's record, message log)."""
    connected = set(grid.get_node_ids())
    directory.ask(grid, connected, timeout_s, strict=False)  # SuperNodes that joined since
    messages: dict[int, Message] = {}
    status: dict[int, str] = {}
    for node, state in run.round_tasks(r):
        supernode = directory.owner.get(node)
        if supernode is None or supernode not in connected:
            status[node] = "unserved"
            continue
        content = message_content({"arrays": ArrayRecord(state), "config": ConfigRecord({"node": node, "round": r})},
                                  run.member_state[node])
        messages[node] = Message(content, dst_node_id=supernode, message_type=MessageType.TRAIN, group_id=str(r),
                                 ttl=timeout_s)
    replies = list(grid.send_and_receive(list(messages.values()), timeout=timeout_s)) if messages else []
    node_of = {msg.metadata.message_id: node for node, msg in messages.items()}  # ids are set when sent
    updates: dict[int, tuple[dict[str, torch.Tensor], dict[str, float], Any]] = {}
    errors: dict[int, str] = {}
    timing: dict[int, dict[str, Any]] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is None or node in updates or node in errors:
            continue  # not an answer to this round's messages
        timing[node] = {"round_trip_s": reply.metadata.created_at - messages[node].metadata.created_at}
        if reply.has_error():
            errors[node], status[node] = _reason(reply), "error"
            log.warning("round %d: node %d failed (error %d: %s)", r + 1, node, reply.error.code, errors[node])
        else:
            metrics = from_flower_metrics(dict(reply.content["metrics"]))
            timing[node].update({k: metrics.pop(k) for k in ("process_s",) if k in metrics})
            timing[node]["compute_s"] = metrics["compute_s"]
            updates[node] = (reply.content["arrays"].to_torch_state_dict(), metrics, message_member_state(reply.content))
            status[node] = "ok"
    missing = sorted(set(messages) - set(updates) - set(errors))
    status.update(dict.fromkeys(missing, "timeout"))
    if missing:
        log.warning("round %d: no reply within %s=%.0f s from nodes %s (%s)", r + 1, ROUND_TIMEOUT_KEY, timeout_s,
                    _ranges(missing), TIMEOUT_HINT)
    unserved = sorted(n for n, s in status.items() if s == "unserved")
    if unserved:
        log.warning("round %d: nodes %s have no connected SuperNode", r + 1, _ranges(unserved))
    if messages and not updates:  # a broken ClientApp, not bad luck: stop instead of "training" without updates
        first = f"; node {min(errors)}: {errors[min(errors)]}" if errors else f"; {TIMEOUT_HINT}"
        raise RunError(f"round {r + 1}: none of the {len(messages)} nodes returned an update{first}")
    failed = sorted(n for n, s in status.items() if s != "ok")
    record = run.finish_round(r, updates, failed=failed)
    log_rows = [{"round": r + 1, "node": n, "supernode": directory.owner.get(n), "status": s, **timing.get(n, {})}
                for n, s in sorted(status.items())]
    return record, log_rows


def _append_messages(run: FedRun, rows: list[dict[str, Any]], *, restart: bool) -> None:
    """The message log, one line per message; on a resumed run the rounds it repeats are dropped."""
    path = run.run.path / MESSAGES
    kept = []
    if restart and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["round"] <= run.start_round]
    with open(path, "w" if restart else "a") as handle:
        handle.writelines(line + "\n" for line in [*kept, *(json.dumps(row) for row in rows)])


def relay(grid: Grid, run: FedRun, *, timeout_s: float = RELAY_KEYS[ROUND_TIMEOUT_KEY],
          wait_s: float = RELAY_KEYS[NODE_WAIT_KEY]) -> dict[str, Any]:
    """Drive `run` from its start (or resume) round to the end through `grid`; returns the summary."""
    directory = Directory(run)
    discover(grid, directory, wait_s=wait_s, timeout_s=timeout_s)
    log.info("gossip relay: %d nodes on %d SuperNodes, run folder %s", run.num_nodes,
             len(set(directory.owner.values())), run.run.path.resolve())
    _append_messages(run, [], restart=True)
    for r in range(run.start_round, run.rounds):
        record, rows = relay_round(grid, run, r, directory, timeout_s)
        _append_messages(run, rows, restart=False)
        log.info("round %d/%d: test_acc %s, consensus %.4g, train_loss %s, failed %s", record["round"], run.rounds,
                 record["test_acc"], record["consensus_distance"], record["train_loss"], _ranges(record["failed"]))
    return run.finish()


def build_server_app(
    cfg: FedConfig | None = None,
    *,
    progress: bool = False,
    timeout_s: float | None = None,
    wait_s: float | None = None,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """The relay for `cfg`, or, with cfg None (as Flower loads `app`), for the config and relay keys
    of the run config. `on_summary` receives the run's summary when it finishes, `on_error` the
    error that stopped it (a diverged run, a refused run folder), which Flower itself only logs."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else fed_config_from_run_config(context.run_config)
        timeout = timeout_s if timeout_s is not None else relay_seconds(context.run_config, ROUND_TIMEOUT_KEY)
        wait = wait_s if wait_s is not None else relay_seconds(context.run_config, NODE_WAIT_KEY)
        try:
            with FedRun(run_cfg, progress=progress) as run:
                summary = relay(grid, run, timeout_s=timeout, wait_s=wait)
        except Exception as err:
            if on_error is not None:
                on_error(err)
            raise
        if on_summary is not None:
            on_summary(summary)

    return server_app


app = build_server_app()  # what pyproject.toml's serverapp component names


def run_flower(
    cfg: FedConfig,
    *,
    progress: bool = True,
    num_supernodes: int | None = None,
    cpus_per_client: float = 1.0,
    timeout_s: float = RELAY_KEYS[ROUND_TIMEOUT_KEY],
) -> dict[str, Any]:
    """Run (or resume) `cfg` in Flower's simulation engine (Ray), in this process, with the same
    apps as `flwr run .`; returns the summary. One SuperNode per node by default (Flower gives
    SuperNode k partition-id k, so it serves nodes k, k+S, ...); Ray runs (CPUs / cpus_per_client)
    ClientApps at a time, on CPU."""
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
    server = build_server_app(cfg, progress=progress, timeout_s=timeout_s, on_summary=summaries.append,
                              on_error=errors.append)
    backend_config = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}}
    run_simulation(server_app=server, client_app=build_client_app(cfg), num_supernodes=num_supernodes,
                   backend_config=backend_config)  # type: ignore[arg-type]
    if errors:
        raise errors[0]
    if not summaries:
        raise RunError("the Flower simulation ended before the ServerApp finished its run (see Flower's log above)")
    return summaries[0]
