"""The one data set registry (`DATASETS`): each loader gives an `ImageSource` (train/test splits as
`datasets.Dataset`s with "image" and "label" columns, plus how pixels become model inputs), which
`samsuite train` turns into tensors (`source_tensors`) and fedsam partitions with flwr-datasets.

Data sets: "digits" (scikit-learn's 8x8 digits, embedded, the fixed stratified split of
`shared.digits`), "cifar10" and "cifar100" (`uoft-cs/cifar10`: columns img, label;
`uoft-cs/cifar100`: img, fine_label, coarse_label; the 100 fine labels are used) and "mnist1d"
(`testbeds.mnist1d`, generated offline). A loader is `loader(data_dir=None, **options)`; each checks
its options, so an unknown option or a bad value is a ValueError that names it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from shared.digits import digits_split
from shared.registry import Registry
from testbeds.augment import Augment, random_crop_flip  # re-exported: the augmentations live apart (torch only)

if TYPE_CHECKING:  # `datasets` is imported where a data set is built: validating a config needs the names only
    from datasets import Dataset, DatasetDict

SPLITS = ("train", "test")
DECODE_CHUNK = 4096  # images decoded at a time
CIFAR_PADDING = 4  # random-crop padding of the standard CIFAR augmentation
# Channel statistics of the CIFAR training sets (the reference code's normalisation).
CIFAR10_MEAN, CIFAR10_STD = (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN, CIFAR100_STD = (0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)


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


class SourceLoader(Protocol):
    """What `DATASETS` holds; a loader may carry `num_train` (its training split's size with the
    default options), so configs can check sizes before anything is loaded."""

    def __call__(self, data_dir: str | None = None, **options: Any) -> ImageSource: ...


DATASETS: Registry[SourceLoader] = Registry("dataset")
# Lazy: the generator package is imported only when MNIST-1D is used.
DATASETS.register("mnist1d", target="testbeds.mnist1d:mnist1d_source")


def check_no_options(dataset: str, options: Mapping[str, Any]) -> None:
    """For loaders without options: the first unknown option is an error that names it."""
    if options:
        key = next(iter(options))
        raise ValueError(f"{key}: unknown option of data set '{dataset}' (it takes none)")


def load_source(name: str, data_dir: str | None = None, options: Mapping[str, Any] | None = None) -> ImageSource:
    """The data set `name` (an unknown name is a did-you-mean error on field "dataset") with `options`."""
    loader = DATASETS.get(name, "dataset")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError
            f"dataset_options: expected a mapping of option names to values, got {options!r}"
        )
    bad = [key for key in options if not isinstance(key, str) or not key.isidentifier()]
    if bad:
        raise ValueError(f"dataset_options: option names must be identifiers, got {bad[0]!r}")
    return loader(data_dir, **options)


def decode_images(
    ds: Dataset,
    pixel_max: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    order: np.ndarray | None = None,
) -> Tensor:
    """Rows `order` (default: all) of the "image" column as float32 (N, C, ...) normalised per channel
    as (pixels / pixel_max - mean) / std. Rows are decoded in storage order, `DECODE_CHUNK` at a time,
    and scattered to their places: sequential reads are fast, and the peak memory is the output plus
    one chunk."""
    order = np.arange(len(ds)) if order is None else order
    place = np.full(len(ds), -1)
    place[order] = np.arange(len(order))
    rows = ds.select_columns(["image"]).with_format("torch")
    shape = tuple(rows[0]["image"].shape) if len(ds) else (len(mean),)
    out = torch.empty((len(order), *shape), dtype=torch.float32)
    per_channel = (-1,) + (1,) * (len(shape) - 1)  # (C, 1, 1) for images, (C, 1) for 1-D signals
    mean_t = torch.tensor(mean, dtype=torch.float32).view(per_channel)
    std_t = torch.tensor(std, dtype=torch.float32).view(per_channel)
    for start in range(0, len(ds), DECODE_CHUNK):
        chunk = rows[start : start + DECODE_CHUNK]["image"].to(torch.float32)
        dest = torch.from_numpy(place[start : start + len(chunk)])
        kept = dest >= 0  # rows outside `order` (e.g. classes no node holds) are skipped
        out[dest[kept]] = (chunk[kept] / pixel_max - mean_t) / std_t
    return out


def label_column(ds: Dataset, name: str = "label") -> np.ndarray:
    """One integer column as an int64 array, read in one go (not row by row)."""
    return np.asarray(ds[name][:], dtype=np.int64)


def source_tensors(source: ImageSource, split: str) -> tuple[Tensor, Tensor]:
    """Split `split` ("train" or "test") of `source` as model inputs: x float32 (N, *shape), normalised
    as (pixels / pixel_max - mean) / std per channel, and y int64 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}. Allowed: {', '.join(SPLITS)}")
    ds = getattr(source, split)
    x = decode_images(ds, source.pixel_max, source.mean, source.std)
    return x, torch.from_numpy(label_column(ds))


@functools.cache  # built once per process: the sources are never modified
def _digits() -> ImageSource:
    from datasets import Array3D, ClassLabel, Dataset, Features

    x_train, y_train, x_test, y_test = digits_split()
    features = Features({"image": Array3D(shape=(1, 8, 8), dtype="float32"), "label": ClassLabel(num_classes=10)})

    def split(x: Tensor, y: Tensor) -> Dataset:
        return Dataset.from_dict({"image": x.numpy(), "label": y.numpy()}, features=features)

    return ImageSource(split(x_train, y_train), split(x_test, y_test), 1.0, (0.0,), (1.0,), None)


@DATASETS.register("digits")
def digits_source(data_dir: str | None = None, **options: Any) -> ImageSource:
    """scikit-learn's digits (embedded; `data_dir` unused) with `shared.digits`' fixed split and scaling."""
    check_no_options("digits", options)
    return _digits()


# `num_train` of a source: its training split's size as shipped or on the hub, so that FedConfig can
# check num_nodes before anything is loaded or built (a local copy in data_dir is checked once loaded).
digits_source.num_train = 1347  # type: ignore[attr-defined]


def _load_splits(name: str, hub_id: str, data_dir: str | None) -> tuple[DatasetDict, str]:
    """The raw splits and where they came from. A local copy in `data_dir/<name>` or `data_dir` (a
    `save_to_disk` folder, or `train*.parquet`/`test*.parquet` files as on the hub) wins over the
    hub, whose download is cached in `data_dir`."""
    from datasets import load_dataset, load_from_disk

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
    from datasets import ClassLabel, Image

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
def cifar10_source(data_dir: str | None = None, **options: Any) -> ImageSource:
    check_no_options("cifar10", options)
    return _cifar_source("cifar10", "uoft-cs/cifar10", "label", 10, CIFAR10_MEAN, CIFAR10_STD, data_dir)


@DATASETS.register("cifar100")
def cifar100_source(data_dir: str | None = None, **options: Any) -> ImageSource:
    check_no_options("cifar100", options)
    return _cifar_source("cifar100", "uoft-cs/cifar100", "fine_label", 100, CIFAR100_MEAN, CIFAR100_STD, data_dir)


cifar10_source.num_train = cifar100_source.num_train = 50_000  # type: ignore[attr-defined]
