"""MNIST-1D (Greydanus 2020, "Scaling Down Deep Learning", greydanus/mnist1d): ten 1-D digit templates
padded, scaled, translated, noised, sheared and subsampled to 40 points by a seeded generator; with
the defaults, the paper's 4,000/1,000 train/test split. Small enough for many seeds on a CPU, hard
enough that architectures and optimizers separate (a linear model ~32 %, a CNN ~94 % in the paper).

Generated offline with the `mnist1d` package's `make_dataset` (never `get_dataset`, which downloads
a pickle and unpickles it). The default generation takes 1.0 s on a 2-core development machine
(plus ~1 s to import the package, which pulls in matplotlib; ~6 s was noted on another machine), so
the arrays are cached in a safetensors file (~0.8 MB) named by a hash of the generator arguments and
the package version (folder: `data_dir`, else `$SAMSUITE_CACHE/mnist1d`, else
`~/.cache/samsuite/mnist1d`); reading the cached default arrays takes ~1.5 ms, building the
`ImageSource` from them ~0.1 s.

`make_dataset` seeds Python's and NumPy's global generators (`mnist1d.utils.set_seed`): both states
are saved and restored around it, so generating data never changes other randomness (not thread-safe
with other users of those global generators while it runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import types
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Array2D, ClassLabel, Dataset, Features

from shared.runio import atomic_replace
from testbeds.sources import ImageSource

NUM_CLASSES = 10
CACHE_FORMAT = 1  # bump when the cached file's layout changes
# The generator's arguments and the package's defaults (mnist1d 0.0.2 `get_dataset_args`, checked by a test).
MNIST1D_DEFAULTS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 0.02,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


@dataclass(frozen=True)
class Mnist1dArrays:
    """Generated MNIST-1D: x float32 (N, final_seq_length), standardised over the whole set; y int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value > high
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bound}, got {value!r}")
    return int(value)


def _float(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name}: expected a finite number >= {low:g}, got {value!r}")
    return float(value)


def split_sizes(num_samples: int, train_split: float) -> tuple[int, int]:
    """(train, test) sizes as `make_dataset` makes them: num_samples // 10 samples per class, then
    the first int(n * train_split) of the shuffled set for training."""
    total = (num_samples // NUM_CLASSES) * NUM_CLASSES
    n_train = int(total * train_split)
    return n_train, total - n_train


def mnist1d_args(**options: Any) -> dict[str, Any]:
    """The generator's full arguments: the defaults updated by `options`, checked; an unknown option
    or a bad value is a ValueError that names it."""
    unknown = [key for key in options if key not in MNIST1D_DEFAULTS]
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown option of data set 'mnist1d'. Allowed: data_dir, {', '.join(MNIST1D_DEFAULTS)}"
        )
    args = {**MNIST1D_DEFAULTS, **options}
    checked: dict[str, Any] = {
        "num_samples": _int("num_samples", args["num_samples"], NUM_CLASSES),  # >= 1 sample per class
        "template_len": _int("template_len", args["template_len"], 1),
        "max_translation": _int("max_translation", args["max_translation"], 1),
        "final_seq_length": _int("final_seq_length", args["final_seq_length"], 1),
        "seed": _int("seed", args["seed"], 0, 2**32 - 1),  # np.random.seed's range
    }
    for key in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
        checked[key] = _float(key, args[key])
    padding = args["padding"]
    if (
        not isinstance(padding, (list, tuple))
        or len(padding) != 2
        or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) for p in padding)
        or not 0 <= padding[0] <= padding[1]
    ):
        raise ValueError(f"padding: expected two integers [low, high] with 0 <= low <= high, got {padding!r}")
    checked["padding"] = (int(padding[0]), int(padding[1]))
    if not isinstance(args["shuffle_seq"], bool):
        raise ValueError(f"shuffle_seq: expected true or false, got {args['shuffle_seq']!r}")  # noqa: TRY004
    checked["shuffle_seq"] = args["shuffle_seq"]
    split = args["train_split"]
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
        raise ValueError(f"train_split: expected a fraction in (0, 1), got {split!r}")
    n_train, n_test = split_sizes(checked["num_samples"], float(split))
    if n_train == 0 or n_test == 0:
        raise ValueError(
            f"train_split: {split} of num_samples={checked['num_samples']} leaves an empty "
            f"{'train' if n_train == 0 else 'test'} split"
        )
    checked["train_split"] = float(split)
    return {key: checked[key] for key in MNIST1D_DEFAULTS}


def _generator_version() -> str:
    try:
        return version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - the import below would fail first
        return "unknown"


def cache_dir(data_dir: str | None = None) -> Path:
    """Where generated sets are kept: `data_dir`, else `$SAMSUITE_CACHE/mnist1d`, else `~/.cache/samsuite/mnist1d`."""
    if data_dir is not None:
        return Path(data_dir)
    root = os.environ.get("SAMSUITE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "samsuite") / "mnist1d"


def cache_key(args: dict[str, Any]) -> str:
    """The JSON text that names a generated set: its arguments, the generator's version, the file format."""
    return json.dumps({"args": args, "mnist1d": _generator_version(), "format": CACHE_FORMAT}, sort_keys=True)


def cache_path(args: dict[str, Any], data_dir: str | None = None) -> Path:
    digest = hashlib.sha256(cache_key(args).encode()).hexdigest()[:16]
    return cache_dir(data_dir) / f"mnist1d-{digest}.safetensors"


def _make(args: dict[str, Any]) -> Mnist1dArrays:
    """`make_dataset(args)` with Python's and NumPy's global generator states restored afterwards."""
    from mnist1d.data import make_dataset  # imports matplotlib: only when generating

    view = types.SimpleNamespace(**{**args, "padding": list(args["padding"])})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(view)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return Mnist1dArrays(
        np.ascontiguousarray(data["x"], dtype=np.float32),
        np.ascontiguousarray(data["y"], dtype=np.int64),
        np.ascontiguousarray(data["x_test"], dtype=np.float32),
        np.ascontiguousarray(data["y_test"], dtype=np.int64),
    )


def _read_cache(path: Path, args: dict[str, Any]) -> Mnist1dArrays:
    """The cached set at `path`, checked against `args` (any mismatch or damage raises)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        if (handle.metadata() or {}).get("key") != cache_key(args):
            raise ValueError("the file was made with other arguments")
        arrays = Mnist1dArrays(*(handle.get_tensor(k) for k in ("x_train", "y_train", "x_test", "y_test")))
    sizes = split_sizes(args["num_samples"], args["train_split"])
    for (x, y), n in zip(((arrays.x_train, arrays.y_train), (arrays.x_test, arrays.y_test)), sizes, strict=True):
        if x.dtype != np.float32 or x.shape != (n, args["final_seq_length"]) or y.dtype != np.int64 or y.shape != (n,):
            raise ValueError(f"unexpected arrays {x.dtype}{x.shape}, {y.dtype}{y.shape}")
        if not np.isfinite(x).all() or y.min() < 0 or y.max() >= NUM_CLASSES:
            raise ValueError("values out of range")
    return arrays


def generate_mnist1d(data_dir: str | None = None, **options: Any) -> Mnist1dArrays:
    """MNIST-1D for the generator arguments `options` (see `MNIST1D_DEFAULTS`): from the cache if a
    valid file is there, else generated and cached (a damaged file is regenerated; an unwritable
    cache folder only warns). The same arguments always give the same arrays."""
    args = mnist1d_args(**options)
    path = cache_path(args, data_dir)
    if path.exists():
        try:
            return _read_cache(path, args)
        except Exception as error:  # noqa: BLE001 - any damage (truncated, garbage, other content): regenerate
            warnings.warn(f"mnist1d: regenerating the damaged cache file {path} ({error})", stacklevel=2)
    arrays = _make(args)
    from safetensors.numpy import save_file

    tensors = {"x_train": arrays.x_train, "y_train": arrays.y_train, "x_test": arrays.x_test, "y_test": arrays.y_test}
    try:
        atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": cache_key(args)}))
    except OSError as error:
        warnings.warn(f"mnist1d: cannot cache the generated set in {path.parent} ({error})", stacklevel=2)
    return arrays


def signal_features(length: int) -> Features:
    """The columns of MNIST-1D data sets: "image" float32 (1, length) (one channel), "label" 10 classes."""
    return Features({"image": Array2D(shape=(1, length), dtype="float32"), "label": ClassLabel(num_classes=NUM_CLASSES)})


def signal_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    """(N, L) signals and their labels as a `datasets.Dataset` with `signal_features(L)`."""
    return Dataset.from_dict({"image": x[:, None, :], "label": y}, features=signal_features(x.shape[1]))


def mnist1d_source(data_dir: str | None = None, **options: Any) -> ImageSource:
    """MNIST-1D as a data set of the registry: `data_dir` is the cache folder, `options` the generator's
    arguments. The generator already standardises the signals (mean 0, std 1 over the whole set), so
    pixel_max 1, mean 0, std 1; no augmentation."""
    arrays = generate_mnist1d(data_dir, **options)
    train = signal_dataset(arrays.x_train, arrays.y_train)
    test = signal_dataset(arrays.x_test, arrays.y_test)
    return ImageSource(train, test, 1.0, (0.0,), (1.0,), None)


# The training split's size with the default options (4,000; FedConfig's early num_nodes check).
_DEFAULT_SIZES = split_sizes(MNIST1D_DEFAULTS["num_samples"], MNIST1D_DEFAULTS["train_split"])
mnist1d_source.num_train = _DEFAULT_SIZES[0]  # type: ignore[attr-defined]
