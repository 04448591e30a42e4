"""Federated image data: a `datasets` data set split over nodes by a flwr-datasets partitioner.

Data sets come from the suite's one registry, `testbeds.sources.DATASETS` (re-exported here with the
other moved names): "digits", "cifar10", "cifar100", "mnist1d". Partitioners (`PARTITIONERS`): "iid",
"dirichlet" (per class, proportions ~ Dir(alpha); alpha 0.3/0.6 in DFedSAM) and "pathological"
(`classes_per_node` classes per node). Each node's partition is split into a local train and test
part (personalised accuracy); the global test split stays whole.

Memory: the training images of all nodes live in one float32 buffer, ordered node by node, and
each node's tensors are views of it, so the footprint is one copy of the data set: CIFAR-10/100
take 50,000 x 3 x 32 x 32 x 4 B = 614 MB (train) + 123 MB (test) = 737 MB per process that loads
them (the relay and every Flower worker); digits take 0.4 MB. Images are decoded in chunks, so the
peak adds only one chunk to that.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsam.partitions import FederatedData, NodeData  # re-exported: their home is the light module
from shared.registry import Registry
from shared.seeding import derive_seed
from shared.validate import check_positive
from testbeds.sources import (  # re-exported: the data sets moved to testbeds, their old import path stays
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_PADDING,
    DATASETS,
    DECODE_CHUNK,
    SPLITS,
    Augment,
    ImageSource,
    cifar10_source,
    cifar100_source,
    decode_images,
    digits_source,
    label_column,
    load_source,
    random_crop_flip,
)

if TYPE_CHECKING:  # imported where a split is built: validating a config needs the names only
    from flwr_datasets.partitioner import Partitioner

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_PADDING", "DATASETS", "DECODE_CHUNK",
    "PARTITIONERS", "SPLITS", "Augment", "FederatedData", "ImageSource", "NodeData", "PartitionOptions",
    "cifar10_source", "cifar100_source", "digits_source", "load_federated", "random_crop_flip",
]


@dataclass(frozen=True)
class PartitionOptions:
    """What a partitioner builder may use; each builder checks the options it reads."""

    num_nodes: int
    alpha: float
    classes_per_node: int
    num_classes: int
    min_size: int
    seed: int


PARTITIONERS: Registry[Callable[[PartitionOptions], Partitioner]] = Registry("partitioner")


@PARTITIONERS.register("iid")
def iid_partitioner(opts: PartitionOptions) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(opts.num_nodes)  # equal shards of the (seeded, shuffled) training set


@PARTITIONERS.register("dirichlet")
def dirichlet_partitioner(opts: PartitionOptions) -> Partitioner:
    # self_balancing stops giving samples to nodes above the average size, as the NIID-Bench/DisPFL
    # code does, which keeps node sizes closer to the reference's equal-sized nodes.
    from flwr_datasets.partitioner import DirichletPartitioner

    check_positive("alpha", opts.alpha)
    return DirichletPartitioner(
        opts.num_nodes,
        "label",
        float(opts.alpha),
        min_partition_size=opts.min_size,
        self_balancing=True,
        seed=opts.seed,
    )


@PARTITIONERS.register("pathological")
def pathological_partitioner(opts: PartitionOptions) -> Partitioner:
    k = opts.classes_per_node
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= opts.num_classes:
        raise ValueError(f"classes_per_node: expected an integer in [1, {opts.num_classes}] (the classes), got {k!r}")
    # "first-deterministic" (McMahan et al.'s split) gives node i class i mod C first, so that
    # every class is used once there are at least as many nodes as classes.
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(
        opts.num_nodes, "label", k, class_assignment_mode="first-deterministic", seed=opts.seed
    )


def _local_split(indices: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of one node: round(n * fraction) test samples, but at least one when
    fraction > 0 and never all (every node keeps >= 1 training sample)."""
    n = len(indices)
    n_test = min(n - 1, max(int(fraction > 0), round(n * fraction)))
    shuffled = rng.permutation(indices)
    return shuffled[n_test:], shuffled[:n_test]


def load_federated(
    dataset: str,
    num_nodes: int,
    *,
    partitioner: str = "dirichlet",
    alpha: float = 0.3,
    classes_per_node: int = 2,
    local_test_fraction: float = 0.2,
    seed: int = 0,
    data_dir: str | None = None,
    dataset_options: Mapping[str, Any] | None = None,
) -> FederatedData:
    """`dataset` (with its `dataset_options`, e.g. MNIST-1D's generator arguments) split over `num_nodes`
    nodes by `partitioner`, each node's share split into a local train/test part; the same for the same
    arguments. Bad arguments raise before images are decoded."""
    DATASETS.get(dataset, "dataset")  # the name first, before anything is loaded
    build_partitioner = PARTITIONERS.get(partitioner, "partitioner")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes: expected an integer >= 1, got {num_nodes!r}")
    if (
        isinstance(local_test_fraction, bool)
        or not isinstance(local_test_fraction, (int, float))
        or not (0 <= local_test_fraction < 1)
    ):
        raise ValueError(f"local_test_fraction: expected a fraction in [0, 1), got {local_test_fraction!r}")

    source = load_source(dataset, data_dir, dataset_options)
    n_train = len(source.train)
    if num_nodes > n_train:
        raise ValueError(
            f"num_nodes: {dataset} has {n_train} training samples, so at most {n_train} nodes; got {num_nodes}"
        )
    num_classes = source.train.features["label"].num_classes
    opts = PartitionOptions(
        num_nodes,
        alpha,
        classes_per_node,
        num_classes,
        min_size=1 + int(local_test_fraction > 0),
        seed=derive_seed(seed, "partition"),
    )
    part = build_partitioner(opts)

    # Partition the labels only (a shuffled label/index table), so no image is decoded until the end.
    labels = label_column(source.train)
    order = np.random.default_rng(derive_seed(seed, "shuffle")).permutation(n_train)
    from datasets import Dataset

    part.dataset = Dataset.from_dict({"label": labels[order], "index": order})
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at each Dirichlet redraw, listing every alpha
            warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
            shares = [label_column(part.load_partition(i), "index") for i in range(num_nodes)]
    except ValueError as error:
        raise ValueError(
            f"partitioner: '{partitioner}' cannot split {n_train} {dataset} samples ({num_classes} classes) over "
            f"num_nodes={num_nodes} (alpha={alpha}, classes_per_node={classes_per_node}): {error}"
        ) from error
    if min(map(len, shares)) == 0:  # the flwr partitioners above never do this; guard the >= 1 train sample promise
        raise ValueError(f"num_nodes: '{partitioner}' left a node without samples; use fewer than {num_nodes} nodes")

    splits = [
        _local_split(share, local_test_fraction, np.random.default_rng(derive_seed(seed, "local-split", node)))
        for node, share in enumerate(shares)
    ]
    node_order = np.concatenate([np.concatenate(pair) for pair in splits])
    x = decode_images(source.train, source.pixel_max, source.mean, source.std, node_order)
    y = torch.from_numpy(labels[node_order])
    nodes, start = [], 0
    for train_idx, test_idx in splits:
        mid, end = start + len(train_idx), start + len(train_idx) + len(test_idx)
        nodes.append(NodeData(x[start:mid], y[start:mid], x[mid:end], y[mid:end]))
        start = end

    test_x = decode_images(source.test, source.pixel_max, source.mean, source.std)
    test_y = torch.from_numpy(label_column(source.test))
    return FederatedData(
        dataset, nodes, test_x, test_y, num_classes, tuple(x.shape[1:]), source.augment
    )
