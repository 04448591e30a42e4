"""A node's data as a model sees it (`NodeData`, `FederatedData`) and as a SuperNode holds it: one
safetensors file per node, written once by `export_partitions` and read back by `load_partitions`.

On a real federation node i's data lives on one machine only. `samsuite fed export-partitions`
writes the split the in-process engine uses (`fedsam.client.federated_data`, the same seed and
settings) as <dir>/node-00007.safetensors (tensors train_x, train_y, test_x, test_y; metadata:
the node and its fingerprint) plus <dir>/manifest.json (the split settings, the model-facing facts
num_classes, input_shape and the augmentation, and every node's file and fingerprint). Copy the
manifest and a machine's own node files there; its SuperNode names the folder in --node-config.

Reading a partition needs torch and safetensors only: no `datasets`, no `flwr-datasets`, which
take seconds to import in every ClientApp process Flower starts. The fingerprint (SHA-256 over
the four tensors) lets the relay check that a SuperNode holds exactly the split it expects.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from shared.config import ConfigError
from shared.runio import atomic_replace, write_json
from testbeds.augment import Augment

if TYPE_CHECKING:
    from fedsam.config import FedConfig

FORMAT = 1  # manifest.json's "format": bump when the files change meaning
MANIFEST = "manifest.json"
AUGMENT_MODULE = "testbeds.augment"  # an exported augmentation is one of its functions, with keywords
#: The FedConfig fields that decide the split: a partition folder is valid for a run iff they agree.
SPLIT_FIELDS = ("dataset", "dataset_options", "num_nodes", "partitioner", "alpha", "classes_per_node",
                "local_test_fraction", "seed")
TENSORS = ("train_x", "train_y", "test_x", "test_y")


@dataclass(frozen=True)
class NodeData:
    """One node's local data, ready for the model: float32 normalised images, int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass(frozen=True)
class FederatedData:
    """The nodes' data plus the global test set; `augment` is the train-time augmentation of a batch.
    `nodes` is indexed by node id: every node (a list), or, in a SuperNode's ClientApp, a dict of
    the nodes it serves (then the global test set is empty: the relay evaluates)."""

    name: str
    nodes: Sequence[NodeData] | Mapping[int, NodeData]
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augment: Augment | None


def split_settings(cfg: FedConfig) -> dict[str, Any]:
    """The settings that decide `cfg`'s split (SPLIT_FIELDS), JSON-ready."""
    return json.loads(json.dumps({name: getattr(cfg, name) for name in SPLIT_FIELDS}))


def fingerprint(node: NodeData) -> str:
    """SHA-256 over the node's four tensors (name, dtype, shape, bytes): equal iff the data is."""
    digest = hashlib.sha256()
    for name in TENSORS:
        tensor = getattr(node, name).contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _augment_spec(augment: Augment | None) -> dict[str, Any] | None:
    """An augmentation as JSON: a `testbeds.augment` function, bare or as a functools.partial."""
    if augment is None:
        return None
    func, keywords = (augment.func, augment.keywords) if isinstance(augment, functools.partial) else (augment, {})
    if getattr(func, "__module__", None) != AUGMENT_MODULE or (isinstance(augment, functools.partial) and augment.args):
        raise ValueError(f"export_partitions: the augmentation {augment!r} is not a {AUGMENT_MODULE} function "
                         "with keyword arguments, so it cannot be written to the manifest")
    return {"name": func.__name__, "keywords": json.loads(json.dumps(keywords))}


def _augment_of(spec: Mapping[str, Any] | None) -> Augment | None:
    if spec is None:
        return None
    func = getattr(importlib.import_module(AUGMENT_MODULE), spec["name"])
    keywords = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["keywords"].items()}
    return functools.partial(func, **keywords)


def node_file(node: int) -> str:
    return f"node-{node:05d}.safetensors"


def read_manifest(folder: str | Path, field: str = "partition-dir") -> dict[str, Any]:
    """<folder>/manifest.json, checked; a missing or foreign folder is a ConfigError naming `field`."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: {folder} holds no readable {MANIFEST} ({err}); write one with "
                          "`samsuite fed export-partitions`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{field}: {path} is not a partition manifest of format {FORMAT}")
    return manifest


def check_split(manifest: Mapping[str, Any], cfg: FedConfig, field: str = "partition-dir") -> None:
    """The manifest's split must be `cfg`'s: a SuperNode never trains on another run's data."""
    want = split_settings(cfg)
    differ = {k: (manifest["split"].get(k), v) for k, v in want.items() if manifest["split"].get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: exported {a!r}, run {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"{field}: the partitions were exported for another split ({shown}); export them "
                          "again with the run's settings")


def export_partitions(cfg: FedConfig, out: str | Path, data: FederatedData | None = None) -> dict[str, Any]:
    """Write `cfg`'s split to `out` (one file per node, then manifest.json, each atomically) and
    return the manifest. A folder that already holds this split is left as it is; one that holds
    another split, or other files, is refused before anything is written."""
    out = Path(out)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out, "out")
        check_split(manifest, cfg, "out")
        return manifest
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out: {out} exists and is not a partition folder; name a new or empty folder")
    if data is None:
        from fedsam.client import federated_data

        data = federated_data(cfg)
    augment = _augment_spec(data.augment)
    fingerprints = []
    for node in range(cfg.num_nodes):
        part = data.nodes[node]
        digest = fingerprint(part)
        tensors = {name: getattr(part, name).clone() for name in TENSORS}  # views of one buffer: own storage each
        meta = {"node": str(node), "fingerprint": digest}
        atomic_replace(out / node_file(node), lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
        fingerprints.append(digest)
    manifest = {"format": FORMAT, "split": split_settings(cfg), "dataset": data.name,
                "num_classes": data.num_classes, "input_shape": list(data.input_shape), "augment": augment,
                "files": [node_file(i) for i in range(cfg.num_nodes)], "fingerprints": fingerprints}
    write_json(out / MANIFEST, manifest)
    return manifest


def load_partitions(folder: str | Path, nodes: Iterable[int], cfg: FedConfig) -> FederatedData:
    """The data a SuperNode's ClientApp trains on: the listed nodes' files from `folder` (the
    others need not be there), checked against `cfg`'s split and their fingerprints."""
    manifest = read_manifest(folder)
    check_split(manifest, cfg)
    loaded: dict[int, NodeData] = {}
    for node in nodes:
        path = Path(folder) / manifest["files"][node]
        try:
            tensors = load_file(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"partition-dir: cannot read node {node}'s partition {path}: {err}") from None
        loaded[node] = NodeData(*(tensors[name] for name in TENSORS))
        if fingerprint(loaded[node]) != manifest["fingerprints"][node]:
            raise ConfigError(f"partition-dir: {path} does not match its fingerprint in {MANIFEST}; export again")
    empty = torch.empty(0)
    return FederatedData(manifest["dataset"], loaded, empty, empty.long(), manifest["num_classes"],
                         tuple(manifest["input_shape"]), _augment_of(manifest["augment"]))
