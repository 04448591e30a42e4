"""fedsam.data: partitions, local splits, the CIFAR loading path (on tiny data sets written with the
hub's exact schema, since the hub is unreachable here), the augmentation and the input errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from flwr_datasets.partitioner import Partitioner
from PIL import Image

from fedsam.data import CIFAR10_MEAN, CIFAR10_STD, PARTITIONERS, FederatedData, load_federated, random_crop_flip
from shared.digits import digits_split
from shared.registry import UnknownNameError

N_TRAIN_DIGITS = 1347  # shared.digits' fixed 75 % split of 1,797 digits


def rows(x: torch.Tensor, y: torch.Tensor | None = None) -> Counter:
    """The multiset of images (exact bytes), with their labels when given."""
    labels = [None] * len(x) if y is None else y.tolist()
    return Counter((img.numpy().tobytes(), label) for img, label in zip(x, labels, strict=True))


def all_node_data(data: FederatedData) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([torch.cat([n.train_x, n.test_x]) for n in data.nodes])
    y = torch.cat([torch.cat([n.train_y, n.test_y]) for n in data.nodes])
    return x, y


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_digits_nodes_hold_exactly_the_training_set(partitioner: str) -> None:
    data = load_federated("digits", 10, partitioner=partitioner, alpha=0.5, classes_per_node=3)
    x_train, y_train, x_test, y_test = digits_split()
    x, y = all_node_data(data)
    # every (image, label) pair once: the partition covers the training set without overlap
    assert rows(x, y) == rows(x_train, y_train)
    assert torch.equal(data.test_x, x_test) and torch.equal(data.test_y, y_test)
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8) and data.augment is None
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert data.name == "digits"


def test_iid_nodes_have_equal_sizes_and_local_test_fraction() -> None:
    data = load_federated("digits", 5, partitioner="iid", local_test_fraction=0.2)
    sizes = [len(n.train_y) + len(n.test_y) for n in data.nodes]
    assert sorted(sizes) == [269, 269, 269, 270, 270]  # 1347 = 5 * 269 + 2
    assert [len(n.test_y) for n in data.nodes] == [round(s * 0.2) for s in sizes]


def test_pathological_nodes_have_exactly_k_classes_and_all_classes_are_used() -> None:
    data = load_federated("digits", 20, partitioner="pathological", classes_per_node=2)
    node_classes = [set(torch.cat([n.train_y, n.test_y]).tolist()) for n in data.nodes]
    assert all(len(c) == 2 for c in node_classes)
    assert set().union(*node_classes) == set(range(10))
    assert [i % 10 in c for i, c in enumerate(node_classes)] == [True] * 20  # first class of node i is i mod 10


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def mean_top_class_share(**kw: object) -> float:
        data = load_federated("digits", 10, seed=3, **kw)  # type: ignore[arg-type]
        shares = [
            torch.bincount(torch.cat([n.train_y, n.test_y]), minlength=10).max() / (len(n.train_y) + len(n.test_y))
            for n in data.nodes
        ]
        return float(torch.stack(shares).mean())

    iid, mild, strong = (
        mean_top_class_share(partitioner="iid"),
        mean_top_class_share(alpha=10.0),
        mean_top_class_share(alpha=0.1),
    )
    assert iid < 0.2 and mild < 0.3 and strong > 0.5


def test_paper_scale_node_count_keeps_train_and_test_on_every_node() -> None:
    data = load_federated("digits", 100, partitioner="dirichlet", alpha=0.3)
    assert min(len(n.train_y) for n in data.nodes) >= 1
    assert min(len(n.test_y) for n in data.nodes) >= 1
    assert sum(len(n.train_y) + len(n.test_y) for n in data.nodes) == N_TRAIN_DIGITS


def test_no_local_test_split() -> None:
    data = load_federated("digits", 3, partitioner="iid", local_test_fraction=0.0)
    assert all(n.test_x.shape == (0, 1, 8, 8) and n.test_y.shape == (0,) for n in data.nodes)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a, b, c = (load_federated("digits", 8, alpha=0.3, seed=s) for s in (7, 7, 8))
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        assert torch.equal(na.train_x, nb.train_x) and torch.equal(na.test_y, nb.test_y)
    assert any(len(na.train_y) != len(nc.train_y) for na, nc in zip(a.nodes, c.nodes, strict=True))


def test_node_tensors_are_views_of_one_buffer() -> None:
    data = load_federated("digits", 6, partitioner="iid")
    pointers = {t.untyped_storage().data_ptr() for n in data.nodes for t in (n.train_x, n.test_x)}
    assert len(pointers) == 1  # one copy of the training images, however many nodes


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"dataset": "digts"}, ["dataset", "did you mean 'digits'", "cifar10, cifar100, digits"]),
        ({"partitioner": "dirichelt"}, ["partitioner", "did you mean 'dirichlet'", "dirichlet, iid, pathological"]),
        ({"num_nodes": N_TRAIN_DIGITS + 1}, ["num_nodes", str(N_TRAIN_DIGITS)]),
        ({"num_nodes": 0}, ["num_nodes", ">= 1"]),
        ({"alpha": 0.0}, ["alpha", "> 0"]),
        ({"alpha": -1.0}, ["alpha", "> 0"]),
        ({"partitioner": "pathological", "classes_per_node": 0}, ["classes_per_node", "[1, 10]"]),
        ({"partitioner": "pathological", "classes_per_node": 11}, ["classes_per_node", "[1, 10]"]),
        ({"local_test_fraction": 1.0}, ["local_test_fraction", "[0, 1)"]),
        ({"local_test_fraction": -0.1}, ["local_test_fraction", "[0, 1)"]),
        ({"num_nodes": 40, "partitioner": "pathological", "classes_per_node": 10, "seed": 0}, None),
    ],
)
def test_bad_input_errors_name_the_field(kwargs: dict, fragments: list[str] | None) -> None:
    args = {"dataset": "digits", "num_nodes": 4, **kwargs}
    if fragments is None:  # a valid corner (every node holds every class) must work
        assert len(load_federated(**args).nodes) == 40
        return
    with pytest.raises(ValueError) as info:
        load_federated(**args)
    for fragment in fragments:
        assert fragment in str(info.value)
    if "did you mean" in fragments[1]:
        assert isinstance(info.value, UnknownNameError)


def test_impossible_dirichlet_split_names_the_fields() -> None:
    # 1000 nodes on 1347 samples with alpha 0.01: flwr-datasets cannot give each node 2 samples
    with pytest.raises(ValueError, match=r"partitioner: 'dirichlet'.*num_nodes=1000.*alpha=0.01"):
        load_federated("digits", 1000, alpha=0.01)


# --- CIFAR: the real loading code, run on tiny data sets with the hub's schema -----------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_dict(num_classes: int, per_class: dict[str, int], fine: bool, seed: int) -> datasets.DatasetDict:
    """Random 32x32 RGB PNGs with the exact `uoft-cs/cifar10` (img, label) or `uoft-cs/cifar100`
    (img, fine_label, coarse_label) features."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, k in per_class.items():
        labels = np.repeat(np.arange(num_classes), k)
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in labels]
        if fine:
            features = datasets.Features(
                {
                    "img": datasets.Image(),
                    "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(100)]),
                    "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)]),
                }
            )
            columns = {"img": images, "fine_label": labels, "coarse_label": labels // 5}
        else:
            features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
            columns = {"img": images, "label": labels}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


@pytest.fixture(scope="module")
def cifar_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cifar")
    c10 = cifar_dict(10, {"train": 8, "test": 2}, fine=False, seed=0)
    c10.save_to_disk(root / "disk" / "cifar10")  # data_dir/<name> layout
    for split, ds in c10.items():  # the hub's parquet layout, directly in data_dir
        ds.to_parquet(str(root / "parquet" / "plain_text" / f"{split}-00000-of-00001.parquet"))
    cifar_dict(100, {"train": 2, "test": 1}, fine=True, seed=1).save_to_disk(root / "c100")
    return {"disk": root / "disk", "parquet": root / "parquet", "c100": root / "c100", "c10": root / "disk" / "cifar10"}


def test_cifar10_loads_normalised_tensors(cifar_dirs: dict[str, Path]) -> None:
    data = load_federated("cifar10", 4, partitioner="iid", data_dir=str(cifar_dirs["disk"]))
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10 and data.augment is not None
    raw = datasets.load_from_disk(str(cifar_dirs["c10"]))
    pixels = np.stack([np.asarray(im, dtype=np.float64) for im in raw["test"]["img"]]).transpose(0, 3, 1, 2)
    mean, std = np.array(CIFAR10_MEAN).reshape(1, 3, 1, 1), np.array(CIFAR10_STD).reshape(1, 3, 1, 1)
    expected = (pixels / 255.0 - mean) / std  # float64 reference of the normalisation
    np.testing.assert_allclose(data.test_x.double().numpy(), expected, rtol=0, atol=1e-5)
    assert data.test_y.tolist() == list(raw["test"]["label"])
    x, y = all_node_data(data)
    assert sum(len(n.train_y) + len(n.test_y) for n in data.nodes) == 80 and torch.bincount(y).tolist() == [8] * 10
    pixels_back = (
        ((x.double() * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) * 255)
        .round()
        .to(torch.uint8)
    )
    raw_train = torch.from_numpy(np.stack([np.asarray(im) for im in raw["train"]["img"]])).permute(0, 3, 1, 2)
    assert rows(pixels_back, y) == rows(raw_train.contiguous(), torch.tensor(raw["train"]["label"]))  # each pair once


def test_cifar10_parquet_layout_gives_the_same_data(cifar_dirs: dict[str, Path]) -> None:
    a = load_federated("cifar10", 3, alpha=0.5, data_dir=str(cifar_dirs["disk"]))
    b = load_federated("cifar10", 3, alpha=0.5, data_dir=str(cifar_dirs["parquet"]))
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        assert torch.equal(na.train_x, nb.train_x) and torch.equal(na.train_y, nb.train_y)
    assert torch.equal(a.test_x, b.test_x)


def test_cifar100_uses_the_fine_labels(cifar_dirs: dict[str, Path]) -> None:
    data = load_federated("cifar100", 5, partitioner="iid", data_dir=str(cifar_dirs["c100"]))
    assert data.num_classes == 100 and data.test_y.tolist() == list(range(100))
    _, y = all_node_data(data)
    assert torch.bincount(y, minlength=100).tolist() == [2] * 100  # coarse labels would give 20 classes


def test_wrong_schema_is_a_clear_error(tmp_path: Path) -> None:
    c10 = cifar_dict(10, {"train": 1, "test": 1}, fine=False, seed=0)
    c10.rename_column("label", "target").save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=r"data_dir: .* lacks the uoft-cs/cifar10 schema.*img \(Image\) and label"):
        load_federated("cifar10", 2, data_dir=str(tmp_path))


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"data_dir: cannot load cifar100 .*uoft-cs/cifar100.*save_to_disk"):
        load_federated("cifar100", 2, data_dir=str(tmp_path))


# --- augmentation -----------------------------------------------------------------------------


def test_random_crop_flip_matches_a_per_image_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    fill = (-1.0, -2.0, -3.0)
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4, fill=fill)
    padded = torch.tensor(fill, dtype=torch.float64).view(1, 3, 1, 1).repeat(16, 1, 40, 40)
    padded[:, :, 4:36, 4:36] = x  # the reference: each image padded with its channel's fill value
    seen = set()
    for i in range(len(x)):  # each output is exactly one of the 9 * 9 crops of its own padded input, maybe flipped
        crops = {(top, left): padded[i, :, top : top + 32, left : left + 32] for top in range(9) for left in range(9)}
        matches = [(pos, False) for pos, crop in crops.items() if torch.equal(out[i], crop)]
        matches += [(pos, True) for pos, crop in crops.items() if torch.equal(out[i], crop.flip(-1))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len({pos for pos, _ in seen}) > 8 and {flip for _, flip in seen} == {False, True}
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1), padding=4, fill=fill))


def test_cifar_augment_is_crop_4_and_flip_padding_with_black(cifar_dirs: dict[str, Path]) -> None:
    data = load_federated("cifar10", 2, partitioner="iid", data_dir=str(cifar_dirs["disk"]))
    assert data.augment is not None
    black = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True))  # a black pixel after normalisation
    out = data.augment(data.test_x, torch.Generator().manual_seed(0))
    expected = random_crop_flip(data.test_x, torch.Generator().manual_seed(0), padding=4, fill=black)
    assert torch.equal(out, expected)


class Lopsided(Partitioner):
    """Everything to node 0, nothing to node 1."""

    num_partitions = 2

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(range(len(self.dataset)) if partition_id == 0 else [])


def test_a_partitioner_that_leaves_a_node_empty_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PARTITIONERS._items, "lopsided", lambda opts: Lopsided())
    with pytest.raises(ValueError, match=r"num_nodes: 'lopsided' left a node without samples"):
        load_federated("digits", 2, partitioner="lopsided")


def test_mnist1d_partitions_for_fedsam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMSUITE_CACHE", str(tmp_path))
    data = load_federated("mnist1d", 10, partitioner="pathological", classes_per_node=2, local_test_fraction=0.2,
                          seed=0, dataset_options={"num_samples": 1000})
    assert data.input_shape == (1, 40) and data.num_classes == 10 and len(data.test_y) == 200
    assert sum(len(n.train_y) + len(n.test_y) for n in data.nodes) == 800  # every training signal, once
    for node in data.nodes:
        assert len(torch.unique(torch.cat([node.train_y, node.test_y]))) <= 2 and node.train_x.shape[1:] == (1, 40)
    again = load_federated("mnist1d", 10, partitioner="pathological", classes_per_node=2, local_test_fraction=0.2,
                           seed=0, dataset_options={"num_samples": 1000})
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(data.nodes, again.nodes, strict=True))
