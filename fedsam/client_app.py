"""The ClientApp: where a SuperNode's logical nodes train, as thin as Flower's quickstart-pytorch.

Flower's Deployment Engine starts a fresh `flwr-clientapp` process for every message, so this
module imports only torch, flwr and the client update (`fedsam.client`, `fedsam.messages`,
`fedsam.partitions`): no `datasets`, `flwr-datasets`, matplotlib or relay modules. Its data is the
SuperNode's own nodes, read from the partition files its node-config names (`fedsam.messages`).

Handlers:
- `query`: which nodes this SuperNode serves, with their data fingerprints (the relay asks once
  per SuperNode and checks them against its split). Reply: ConfigRecord {"nodes", "fingerprints"}.
- `train`: node i's local update (`fedsam.client.local_update`, the in-process engine's function)
  from the x_i and member state it was sent: {"arrays": x_i, "config": {node, round}[, "member"]}.
  Reply: {"arrays": y_i, "metrics": MetricRecord(train_loss, num-examples, num_steps, compute_s,
  process_s)[, "member"]}; process_s is the age of this process when the reply is built: a cold
  message's whole cost inside the ClientApp (imports, data, first step, training).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedsam.client import federated_data, local_update
from fedsam.config import FedConfig
from fedsam.messages import (
    PARTITION_DIR,
    context_config,
    message_content,
    message_member_state,
    served_nodes,
    to_flower_metrics,
)
from fedsam.partitions import FederatedData, fingerprint, load_partitions
from shared.config import ConfigError


def process_age() -> float:
    """Seconds since this process started (Linux /proc; NaN elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@functools.lru_cache(maxsize=2)
def _partition_data(folder: str, nodes: tuple[int, ...], run_items: tuple[tuple[str, Any], ...]) -> FederatedData:
    return load_partitions(folder, nodes, context_config(dict(run_items)))


def served_data(cfg: FedConfig, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
                ) -> tuple[list[int], FederatedData]:
    """(the nodes this SuperNode serves, their data): from its partition-dir, or, without one (the
    simulation engines, every process holding the whole split), the split built here."""
    nodes = served_nodes(node_config, cfg.num_nodes)
    folder = node_config.get(PARTITION_DIR)
    if folder in (None, ""):
        return nodes, federated_data(cfg)
    return nodes, _partition_data(str(folder), tuple(nodes), tuple(sorted(run_config.items())))


def query_nodes(context: Context, cfg: FedConfig) -> ConfigRecord:
    nodes, data = served_data(cfg, context.node_config, context.run_config)
    return ConfigRecord({"nodes": nodes, "fingerprints": [fingerprint(data.nodes[i]) for i in nodes]})


def train_node(msg: Message, context: Context, cfg: FedConfig) -> Message:
    """Node i's local update from the x_i (and member state) it was sent; the reply carries y_i
    and the new member state."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = msg.content["config"]
    node, round_idx = int(task["node"]), int(task["round"])
    nodes, data = served_data(cfg, context.node_config, context.run_config)
    if node not in nodes:
        raise ConfigError(f"node-config: this SuperNode serves nodes {nodes}, not node {node}")
    state = msg.content["arrays"].to_torch_state_dict()
    y, metrics, member = local_update(state, node, round_idx, cfg, data, member_state=message_member_state(msg.content))
    metrics = to_flower_metrics({**metrics, "process_s": process_age()})
    return Message(message_content({"arrays": ArrayRecord(y), "metrics": MetricRecord(metrics)}, member), reply_to=msg)


def build_client_app(cfg: FedConfig | None = None) -> ClientApp:
    """The ClientApp for `cfg`, or, with None (as Flower loads `app`), for the run config."""
    client_app = ClientApp()

    def config_of(context: Context) -> FedConfig:
        return cfg if cfg is not None else context_config(context.run_config)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        record = query_nodes(context, config_of(context))
        record["query_s"] = time.perf_counter() - t0
        return Message(message_content({"config": record}, {}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_node(msg, context, config_of(context))

    return client_app


app = build_client_app()  # what pyproject.toml's clientapp component names
