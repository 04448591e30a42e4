"""What the Flower apps share: the run config as a `FedConfig`, a SuperNode's node-config as the
logical nodes it serves, and the records of a message. Light on purpose (torch, flwr.app and
fedsam.client): `fedsam.client_app` imports it in every ClientApp process Flower starts.

Run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run . --run-config "k=v ..."`):
every key is a `FedConfig` field in kebab-case (`num-nodes` -> num_nodes); a nested key fills a
mapping field (`topology-options.k` -> topology_options["k"]); the empty string means null (the
field's default None, or an unset option). The relay's own keys: `round-timeout` (seconds it
waits for a round's replies; also the messages' time-to-live) and `node-wait` (seconds it waits
at the start for SuperNodes to claim every node).

Node-config (`flower-supernode --node-config "..."`): which logical nodes a SuperNode serves,
either Flower's convention `partition-id=K num-partitions=S` (nodes K, K+S, K+2S, ...; Flower's
simulation sets these for every SuperNode) or an explicit `nodes='0,3,5-7'`; and where their
data is, `partition-dir='/data/partitions'` (files from `samsuite fed export-partitions`).
Without a partition-dir the ClientApp builds the whole split itself (the simulation engines).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from fedsam.client import MemberState, flatten_member_state, unflatten_member_state
from fedsam.config import FedConfig
from shared.config import ConfigError, from_dict

ROUND_TIMEOUT_KEY = "round-timeout"
NODE_WAIT_KEY = "node-wait"
RELAY_KEYS = {ROUND_TIMEOUT_KEY: 3600.0, NODE_WAIT_KEY: 120.0}  # defaults; generous, as Flower's strategies
NULL = ""  # TOML has no null: the empty string stands for None in the run config
MEMBER_KEY = "member"  # the message entry of a node's member state (absent when it is empty)
#: FedRun's metric names that Flower spells differently in a reply's MetricRecord.
METRIC_KEYS = {"num_examples": "num-examples"}
NODES_KEY, PARTITION_ID, NUM_PARTITIONS, PARTITION_DIR = "nodes", "partition-id", "num-partitions", "partition-dir"


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
        if key in RELAY_KEYS:
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


def relay_seconds(run_config: Mapping[str, Any], key: str) -> float:
    """One of the relay's own keys (RELAY_KEYS: seconds > 0), or its default."""
    value = run_config.get(key, RELAY_KEYS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: expected a number of seconds > 0, got {value!r}")
    return float(value)


@functools.lru_cache(maxsize=4)
def _cached_config(items: tuple[tuple[str, Any], ...]) -> FedConfig:
    return fed_config_from_run_config(dict(items))


def context_config(run_config: Mapping[str, Any]) -> FedConfig:
    """A warm ClientApp process sees the same run config for every message: parse it once."""
    return _cached_config(tuple(sorted(run_config.items())))


# ---------------------------------------------------------------------------------------------- node-config
def _node_list(text: str) -> list[int]:
    nodes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(part)
        nodes.extend(range(int(first), int(last if dash else first) + 1))
    return nodes


def served_nodes(node_config: Mapping[str, Any], num_nodes: int) -> list[int]:
    """The logical nodes a SuperNode serves (sorted), from its node-config (module docstring)."""
    if NODES_KEY in node_config:
        value = node_config[NODES_KEY]
        try:
            nodes = [value] if isinstance(value, int) and not isinstance(value, bool) else _node_list(str(value))
        except ValueError as err:
            raise ConfigError(f"node-config: {NODES_KEY}={value!r}: expected node ids such as '0,3,5-7' "
                              f"(bad part {err})") from None
        outside = sorted({n for n in nodes if not 0 <= n < num_nodes})
        if outside:
            raise ConfigError(f"node-config: {NODES_KEY} {outside} are outside the run's num-nodes={num_nodes} "
                              f"(ids 0..{num_nodes - 1})")
        return sorted(set(nodes))
    if PARTITION_ID in node_config or NUM_PARTITIONS in node_config:
        pid, parts = node_config.get(PARTITION_ID), node_config.get(NUM_PARTITIONS)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, parts)) or not 0 <= pid < parts:
            raise ConfigError(f"node-config: expected integers {NUM_PARTITIONS} >= 1 and 0 <= {PARTITION_ID} < "
                              f"{NUM_PARTITIONS}; got {PARTITION_ID}={pid!r} {NUM_PARTITIONS}={parts!r}")
        return list(range(pid, num_nodes, parts))
    raise ConfigError(f"node-config: name the nodes this SuperNode serves: {PARTITION_ID}=K {NUM_PARTITIONS}=S "
                      f"(Flower's convention) or {NODES_KEY}='0,3,5-7'; got {dict(node_config)!r}")


# ---------------------------------------------------------------------------------------------- records
def message_content(records: dict[str, Any], member_state: MemberState) -> RecordDict:
    """A message's records, plus the member state (flattened) when there is one: runs whose
    optimizer keeps none send exactly what they did before."""
    if member_state:
        records = {**records, MEMBER_KEY: ArrayRecord(flatten_member_state(member_state))}
    return RecordDict(records)


def message_member_state(content: RecordDict) -> MemberState:
    """The member state a message carries ({} when it has none)."""
    return unflatten_member_state(content[MEMBER_KEY].to_torch_state_dict()) if MEMBER_KEY in content else {}


def to_flower_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {METRIC_KEYS.get(k, k): v for k, v in metrics.items()}


def from_flower_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    back = {v: k for k, v in METRIC_KEYS.items()}
    return {back.get(k, k): v for k, v in metrics.items()}
