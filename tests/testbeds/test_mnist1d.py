"""testbeds.mnist1d: the generator's defaults and split sizes, determinism without side effects on the
global generators, the safetensors cache (keyed by the arguments, damage regenerated) and the option errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array2D, ClassLabel

from testbeds import mnist1d as m1d
from testbeds.sources import DATASETS, load_source, source_tensors

SMALL = {"num_samples": 200}


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches in its own folder, never in ~/.cache."""
    monkeypatch.setenv("SAMSUITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mnist1d"


def arrays_equal(a: m1d.Mnist1dArrays, b: m1d.Mnist1dArrays) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_test", "y_test"))


def test_defaults_are_the_packages() -> None:
    from mnist1d.data import get_dataset_args

    package = get_dataset_args(as_dict=True)
    package.pop("url")  # only get_dataset (download) reads it
    assert {**m1d.MNIST1D_DEFAULTS, "padding": list(m1d.MNIST1D_DEFAULTS["padding"])} == package
    assert m1d.mnist1d_args() == m1d.MNIST1D_DEFAULTS


def test_paper_split_with_the_defaults(tmp_path: Path) -> None:
    source = load_source("mnist1d", str(tmp_path))
    assert (len(source.train), len(source.test)) == (4000, 1000)
    assert DATASETS.get("mnist1d").num_train == 4000
    assert source.train.features["image"] == Array2D(shape=(1, 40), dtype="float32")
    assert isinstance(source.train.features["label"], ClassLabel) and source.train.features["label"].num_classes == 10
    assert (source.pixel_max, source.mean, source.std, source.augment) == (1.0, (0.0,), (1.0,), None)
    x, y = source_tensors(source, "train")
    assert x.shape == (4000, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # the generator standardises


def test_generation_is_deterministic_and_leaves_the_global_generators_alone(tmp_path: Path) -> None:
    random.seed(123)
    np.random.seed(7)
    py_state, np_state = random.getstate(), np.random.get_state()
    a = m1d.generate_mnist1d(str(tmp_path / "a"), **SMALL)
    b = m1d.generate_mnist1d(str(tmp_path / "b"), **SMALL)  # another folder: generated again, not loaded
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert arrays_equal(a, b)
    assert (a.x_train.shape, a.x_test.shape) == ((160, 40), (40, 40))
    c = m1d.generate_mnist1d(str(tmp_path / "c"), **SMALL, seed=43)
    assert not np.array_equal(a.x_train, c.x_train)


def test_arguments_reach_the_generator(tmp_path: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.final_seq_length, args.shear_scale = 100, 24, 0.1
    ref = make_dataset(args)
    ours = m1d.generate_mnist1d(str(tmp_path), num_samples=100, final_seq_length=24, shear_scale=0.1)
    assert np.array_equal(ours.x_train, ref["x"].astype(np.float32)) and np.array_equal(ours.y_test, ref["y_test"])


def test_cache_round_trips_and_is_keyed_by_the_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_home: Path
) -> None:
    first = m1d.generate_mnist1d(**SMALL)  # default folder: $SAMSUITE_CACHE/mnist1d
    files = list(cache_home.glob("*.safetensors"))
    assert files == [m1d.cache_path(m1d.mnist1d_args(**SMALL))]

    def no_generation(args: object) -> None:
        raise AssertionError("generated again instead of loading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(m1d, "_make", no_generation)
        assert arrays_equal(m1d.generate_mnist1d(**SMALL), first)
    m1d.generate_mnist1d(**SMALL, iid_noise_scale=0.05)
    assert len(list(cache_home.glob("*.safetensors"))) == 2  # other arguments, another file
    assert m1d.cache_path(m1d.mnist1d_args(**SMALL)) != m1d.cache_path(m1d.mnist1d_args(**SMALL, seed=1))
    # data_dir wins over $SAMSUITE_CACHE
    m1d.generate_mnist1d(str(tmp_path / "here"), **SMALL)
    assert len(list((tmp_path / "here").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("damage", [b"not a safetensors file", b""])
def test_a_damaged_cache_file_is_regenerated(tmp_path: Path, damage: bytes) -> None:
    good = m1d.generate_mnist1d(str(tmp_path), **SMALL)
    path = m1d.cache_path(m1d.mnist1d_args(**SMALL), str(tmp_path))
    path.write_bytes(damage)
    with pytest.warns(UserWarning, match="regenerating the damaged cache file"):
        again = m1d.generate_mnist1d(str(tmp_path), **SMALL)
    assert arrays_equal(again, good)
    assert arrays_equal(m1d._read_cache(path, m1d.mnist1d_args(**SMALL)), good)  # rewritten whole


def test_a_cache_file_of_other_arguments_is_not_used(tmp_path: Path) -> None:
    other = m1d.cache_path(m1d.mnist1d_args(**SMALL, seed=1), str(tmp_path))
    m1d.generate_mnist1d(str(tmp_path), **SMALL, seed=1)
    path = m1d.cache_path(m1d.mnist1d_args(**SMALL), str(tmp_path))
    path.write_bytes(other.read_bytes())  # the right name, the wrong content
    with pytest.warns(UserWarning, match="other arguments"):
        data = m1d.generate_mnist1d(str(tmp_path), **SMALL)
    assert arrays_equal(data, m1d.generate_mnist1d(str(tmp_path / "fresh"), **SMALL))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_samples": 5}, "num_samples"),
        ({"num_samples": True}, "num_samples"),
        ({"num_samples": 100.0}, "num_samples"),
        ({"iid_noise_scale": -0.1}, "iid_noise_scale"),
        ({"corr_noise_scale": float("nan")}, "corr_noise_scale"),
        ({"shear_scale": "big"}, "shear_scale"),
        ({"train_split": 1.0}, "train_split"),
        ({"train_split": 0.0}, "train_split"),
        ({"num_samples": 10, "train_split": 0.05}, "train_split"),  # int(10 * 0.05) = 0 training samples
        ({"padding": (60, 36)}, "padding"),
        ({"padding": 36}, "padding"),
        ({"max_translation": 0}, "max_translation"),
        ({"final_seq_length": 0}, "final_seq_length"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"shuffle_seq": 1}, "shuffle_seq"),
        ({"num_sample": 100}, "num_sample"),
    ],
)
def test_bad_options_name_the_field(options: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        load_source("mnist1d", str(tmp_path), options)
    assert not list(tmp_path.glob("*.safetensors"))  # checked before anything is generated


def test_options_through_the_registry(tmp_path: Path) -> None:
    source = load_source("mnist1d", str(tmp_path), {"num_samples": 100, "final_seq_length": 24})
    assert (len(source.train), len(source.test)) == (80, 20)
    assert source_tensors(source, "test")[0].shape == (20, 1, 24)
    corner = m1d.generate_mnist1d(str(tmp_path), num_samples=10, train_split=0.95)  # int(9.5) = 9 train, 1 test
    assert (corner.x_train.shape, corner.x_test.shape) == ((9, 40), (1, 40))
