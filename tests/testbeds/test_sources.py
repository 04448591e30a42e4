"""testbeds.sources: the one data set registry (shared with fedsam.data), loader options, and
`source_tensors`' normalisation against a float64 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array3D, ClassLabel, Dataset, Features

import fedsam.data
import testbeds
from shared.digits import digits_split
from shared.registry import UnknownNameError
from testbeds import sources
from testbeds.sources import DATASETS, ImageSource, load_source, source_tensors


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMSUITE_CACHE", str(tmp_path / "cache"))


def test_fedsam_uses_the_one_registry() -> None:
    for name in ("DATASETS", "ImageSource", "digits_source", "cifar10_source", "cifar100_source", "random_crop_flip",
                 "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"):
        assert getattr(fedsam.data, name) is getattr(sources, name), name
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "mnist1d"]
    assert testbeds.DATASETS is DATASETS and testbeds.load_source is load_source


def test_the_package_exports_resolve() -> None:
    for name in testbeds.__all__:
        assert getattr(testbeds, name) is not None, name
    assert sorted(testbeds.__all__) == sorted(testbeds._WHERE)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = testbeds.nope


def test_digits_tensors_are_the_fixed_split() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    source = load_source("digits")
    for split, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
        got_x, got_y = source_tensors(source, split)
        assert torch.equal(got_x, x) and torch.equal(got_y, y)
        assert got_x.dtype == torch.float32 and got_y.dtype == torch.int64


def test_normalisation_per_channel_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 3, 4, 6)).astype(np.uint8)
    labels = rng.integers(0, 4, size=5)
    features = Features({"image": Array3D(shape=(3, 4, 6), dtype="uint8"), "label": ClassLabel(num_classes=4)})
    ds = Dataset.from_dict({"image": pixels, "label": labels}, features=features)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    source = ImageSource(ds, ds, 255.0, mean, std, None)
    x, y = source_tensors(source, "train")
    ref = (pixels.astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert x.shape == (5, 3, 4, 6) and x.dtype == torch.float32
    assert np.allclose(x.numpy(), ref, atol=1e-5)
    assert np.array_equal(y.numpy(), labels)


def test_one_dimensional_signals_are_normalised_per_channel(tmp_path: Path) -> None:
    source = load_source("mnist1d", str(tmp_path), {"num_samples": 50})
    shifted = ImageSource(source.train, source.test, 2.0, (0.5,), (4.0,), None)
    x, _ = source_tensors(source, "test")
    x2, _ = source_tensors(shifted, "test")
    assert x.shape == (10, 1, 40)
    assert torch.allclose(x2, (x / 2.0 - 0.5) / 4.0)


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar100"])
def test_sources_without_options_name_an_unknown_one(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"^num_samples: unknown option of data set '{name}'"):
        load_source(name, str(tmp_path), {"num_samples": 100})  # before any hub access


def test_bad_names_and_options_name_the_field() -> None:
    with pytest.raises(UnknownNameError, match=r"^dataset: unknown dataset 'mnist-1d'; did you mean 'mnist1d'"):
        load_source("mnist-1d")
    with pytest.raises(ValueError, match="^dataset_options: expected a mapping"):
        load_source("digits", None, [("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^split: unknown split 'val'"):
        source_tensors(load_source("digits"), "val")
