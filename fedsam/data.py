"""Federated image data: a `datasets` data set split over nodes by a flwr-datasets partitioner.

Data sets (`DATASETS`): "digits" (scikit-learn's 8x8 digits, embedded, the fixed stratified split
of `shared.digits`), "cifar10" and "cifar100" (`uoft-cs/cifar10`: columns img, label;
`uoft-cs/cifar100`: img, fine_label, coarse_label; the 100 fine labels are used). Partitioners
(`PARTITIONERS`): "iid", "dirichlet" (per class, proportions ~ Dir(alpha); alpha 0.3/0.6 in
DFedSAM) and "pathological" (`classes_per_node` classes per node). Each node's partition is split
into a local train and test part (personalised accuracy); the global test split stays whole.

Memory: the training images of all nodes live in one float32 buffer, ordered node by node, and
each node's tensors are views of it, so the footprint is one copy of the data set: CIFAR-10/100
take 50,000 x 3 x 32 x 32 x 4 B = 614 MB (train) + 123 MB (test) = 737 MB per process that loads
them (the relay and every Flower worker); digits take 0.4 MB. Images are decoded in chunks, so the
peak adds only one chunk to that.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset, load_from_disk
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner
from torch import Tensor

from shared.digits import digits_split
from shared.registry import Registry
from shared.seeding import derive_seed
from shared.validate import check_positive

Augment = Callable[[Tensor, torch.Generator], Tensor]

SPLITS = ("train", "test")
DECODE_CHUNK = 4096  # images decoded at a time
CIFAR_PADDING = 4  # random-crop padding of the standard CIFAR augmentation
# Channel statistics of the CIFAR training sets (the reference code's normalisation).
CIFAR10_MEAN, CIFAR10_STD = (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN, CIFAR100_STD = (0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)


@dataclass(frozen=True)
class NodeData:
    """One node's local data, ready for the model: float32 normalised images, int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass(frozen=True)
class FederatedData:
    """All nodes' data plus the global test set; `augment` is the train-time augmentation of a batch."""

    name: str
    nodes: list[NodeData]
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augment: Augment | None


@dataclass(frozen=True)
class ImageSource:
    """A data set as loaded, before partitioning: splits with columns "image" and "label" (a
    ClassLabel), and how pixels become model inputs: (pixels / pixel_max - mean) / std."""

    train: Dataset
    test: Dataset
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment | None


@dataclass(frozen=True)
class PartitionOptions:
    """What a partitioner builder may use; each builder checks the options it reads."""

    num_nodes: int
    alpha: float
    classes_per_node: int
    num_classes: int
    min_size: int
    seed: int


DATASETS: Registry[Callable[[str | None], ImageSource]] = Registry("dataset")
PARTITIONERS: Registry[Callable[[PartitionOptions], Partitioner]] = Registry("partitioner")


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int, fill: tuple[float, ...]) -> Tensor:
    """Random crop with `padding` and horizontal flip of a batch (B, C, H, W), as torchvision's
    RandomCrop(H, padding) + RandomHorizontalFlip on each image (there is no CPU torchvision
    wheel); the padding takes `fill`, the normalised value of a black pixel. The draws come from
    the CPU `generator`, so a seeded run repeats on any device."""
    b, c, h, w = x.shape
    padded = (
        torch.tensor(fill, dtype=x.dtype, device=x.device)
        .view(1, c, 1, 1)
        .repeat(b, 1, h + 2 * padding, w + 2 * padding)
    )
    padded[:, :, padding : padding + h, padding : padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = top[:, None] + torch.arange(h, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@DATASETS.register("digits")
@functools.cache  # built once per process: the sources are never modified
def digits_source(data_dir: str | None = None) -> ImageSource:
    """scikit-learn's digits (embedded; `data_dir` unused) with `shared.digits`' fixed split and scaling."""
    x_train, y_train, x_test, y_test = digits_split()
    features = Features({"image": Array3D(shape=(1, 8, 8), dtype="float32"), "label": ClassLabel(num_classes=10)})

    def split(x: Tensor, y: Tensor) -> Dataset:
        return Dataset.from_dict({"image": x.numpy(), "label": y.numpy()}, features=features)

    return ImageSource(split(x_train, y_train), split(x_test, y_test), 1.0, (0.0,), (1.0,), None)


# `num_train` of a source: its training split's size as shipped or on the hub, so that FedConfig can
# check num_nodes before anything is loaded or built (a local copy in data_dir is checked once loaded).
digits_source.num_train = 1347  # type: ignore[attr-defined]


def _load_splits(name: str, hub_id: str, data_dir: str | None) -> tuple[DatasetDict, str]:
    """The raw splits and where they came from. A local copy in `data_dir/<name>` or `data_dir` (a
    `save_to_disk` folder, or `train*.parquet`/`test*.parquet` files as on the hub) wins over the
    hub, whose download is cached in `data_dir`."""
    for folder in [] if data_dir is None else [Path(data_dir) / name, Path(data_dir)]:
        if (folder / "dataset_dict.json").is_file():
            return load_from_disk(str(folder)), str(folder)
        files = {split: sorted(map(str, folder.rglob(f"{split}*.parquet"))) for split in SPLITS}
        if all(files.values()):
            return load_dataset("parquet", data_files=files, cache_dir=str(Path(data_dir, ".cache"))), str(folder)
    try:
        return load_dataset(hub_id, cache_dir=data_dir), hub_id
    except Exception as error:  # any failure to reach or read the hub ends the same way: say what to provide
        raise ValueError(
            f"data_dir: cannot load {name} from the Hugging Face hub ({hub_id}: {error}); put a copy in "
            f"data_dir={data_dir!r} (a DatasetDict.save_to_disk folder or train/test parquet files, "
            f"optionally in a '{name}' subfolder) or make the hub reachable"
        ) from error


def _cifar_source(
    name: str,
    hub_id: str,
    label: str,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    data_dir: str | None,
) -> ImageSource:
    splits, origin = _load_splits(name, hub_id, data_dir)
    expected = f"splits train and test with columns img (Image) and {label} (ClassLabel, {num_classes} classes)"
    for split in SPLITS:
        features = splits[split].features if split in splits else {}
        if not (
            isinstance(features.get("img"), Image)
            and isinstance(features.get(label), ClassLabel)
            and features[label].num_classes == num_classes
        ):
            found = {s: dict(d.features) for s, d in splits.items()}
            raise ValueError(f"data_dir: {origin} lacks the {hub_id} schema: expected {expected}; found {found}")

    def standard(ds: Dataset) -> Dataset:
        ds = ds.select_columns(["img", label]).rename_columns({"img": "image", label: "label"})
        return ds.cast_column("image", Image(mode="RGB"))

    fill = tuple(-m / s for m, s in zip(mean, std, strict=True))  # a black pixel, normalised
    augment = functools.partial(random_crop_flip, padding=CIFAR_PADDING, fill=fill)
    return ImageSource(standard(splits["train"]), standard(splits["test"]), 255.0, mean, std, augment)


@DATASETS.register("cifar10")
def cifar10_source(data_dir: str | None = None) -> ImageSource:
    return _cifar_source("cifar10", "uoft-cs/cifar10", "label", 10, CIFAR10_MEAN, CIFAR10_STD, data_dir)


@DATASETS.register("cifar100")
def cifar100_source(data_dir: str | None = None) -> ImageSource:
    return _cifar_source("cifar100", "uoft-cs/cifar100", "fine_label", 100, CIFAR100_MEAN, CIFAR100_STD, data_dir)


cifar10_source.num_train = cifar100_source.num_train = 50_000  # type: ignore[attr-defined]


@PARTITIONERS.register("iid")
def iid_partitioner(opts: PartitionOptions) -> Partitioner:
    return IidPartitioner(opts.num_nodes)  # equal shards of the (seeded, shuffled) training set


@PARTITIONERS.register("dirichlet")
def dirichlet_partitioner(opts: PartitionOptions) -> Partitioner:
    # self_balancing stops giving samples to nodes above the average size, as the NIID-Bench/DisPFL
    # code does, which keeps node sizes closer to the reference's equal-sized nodes.
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
    return PathologicalPartitioner(
        opts.num_nodes, "label", k, class_assignment_mode="first-deterministic", seed=opts.seed
    )


def _images(ds: Dataset, source: ImageSource, order: np.ndarray | None = None) -> Tensor:
    """Rows `order` (default: all) of the "image" column as normalised float32 (N, C, H, W). Rows are
    decoded in storage order, `DECODE_CHUNK` at a time, and scattered to their places: sequential
    reads are fast, and the peak memory is the output plus one chunk."""
    order = np.arange(len(ds)) if order is None else order
    place = np.full(len(ds), -1)
    place[order] = np.arange(len(order))
    rows = ds.select_columns(["image"]).with_format("torch")
    out = torch.empty((len(order), *rows[0]["image"].shape), dtype=torch.float32)
    mean = torch.tensor(source.mean).view(-1, 1, 1)
    std = torch.tensor(source.std).view(-1, 1, 1)
    for start in range(0, len(ds), DECODE_CHUNK):
        chunk = rows[start : start + DECODE_CHUNK]["image"].to(torch.float32)
        dest = torch.from_numpy(place[start : start + len(chunk)])
        kept = dest >= 0  # rows outside `order` (classes no node holds) are skipped
        out[dest[kept]] = (chunk[kept] / source.pixel_max - mean) / std
    return out


def _column(ds: Dataset, name: str) -> np.ndarray:
    """One integer column as an int64 array, read in one go (not row by row)."""
    return np.asarray(ds[name][:], dtype=np.int64)


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
) -> FederatedData:
    """`dataset` split over `num_nodes` nodes by `partitioner`, each node's share split into a local
    train/test part; the same for the same arguments. Bad arguments raise before images are decoded."""
    load = DATASETS.get(dataset, "dataset")
    build_partitioner = PARTITIONERS.get(partitioner, "partitioner")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes: expected an integer >= 1, got {num_nodes!r}")
    if (
        isinstance(local_test_fraction, bool)
        or not isinstance(local_test_fraction, (int, float))
        or not (0 <= local_test_fraction < 1)
    ):
        raise ValueError(f"local_test_fraction: expected a fraction in [0, 1), got {local_test_fraction!r}")

    source = load(data_dir)
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
    labels = _column(source.train, "label")
    order = np.random.default_rng(derive_seed(seed, "shuffle")).permutation(n_train)
    part.dataset = Dataset.from_dict({"label": labels[order], "index": order})
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at each Dirichlet redraw, listing every alpha
            warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
            shares = [_column(part.load_partition(i), "index") for i in range(num_nodes)]
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
    x = _images(source.train, source, node_order)
    y = torch.from_numpy(labels[node_order])
    nodes, start = [], 0
    for train_idx, test_idx in splits:
        mid, end = start + len(train_idx), start + len(train_idx) + len(test_idx)
        nodes.append(NodeData(x[start:mid], y[start:mid], x[mid:end], y[mid:end]))
        start = end

    test_y = torch.from_numpy(_column(source.test, "label"))
    return FederatedData(
        dataset, nodes, _images(source.test, source), test_y, num_classes, tuple(x.shape[1:]), source.augment
    )
