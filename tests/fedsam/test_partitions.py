"""Exported partitions: the in-process engine's split, one safetensors file per node, read back
without the data libraries; a folder of another split, a damaged file or a foreign folder is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsam.client import federated_data
from fedsam.config import FedConfig
from fedsam.partitions import MANIFEST, export_partitions, fingerprint, load_partitions, node_file
from shared.config import ConfigError


def cfg_of(**kw: object) -> FedConfig:
    return FedConfig(num_nodes=5, partitioner="dirichlet", alpha=0.5, seed=3, **kw)  # type: ignore[arg-type]


def test_export_writes_the_inprocess_split_and_reads_back_any_subset(tmp_path: Path) -> None:
    cfg = cfg_of()
    manifest = export_partitions(cfg, tmp_path / "parts")
    data = federated_data(cfg)
    assert manifest["files"] == [node_file(i) for i in range(5)] and manifest["num_classes"] == 10
    assert manifest["fingerprints"] == [fingerprint(data.nodes[i]) for i in range(5)]
    for i in (1, 4):  # a machine holds only its own nodes' files
        (tmp_path / "parts" / node_file(i)).unlink()
    got = load_partitions(tmp_path / "parts", [0, 3], cfg)
    assert sorted(got.nodes) == [0, 3] and got.input_shape == data.input_shape and got.augment is None
    for i in (0, 3):
        for name in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(got.nodes[i], name), getattr(data.nodes[i], name)), (i, name)
    with pytest.raises(ConfigError, match="partition-dir: cannot read node 1's partition"):
        load_partitions(tmp_path / "parts", [1], cfg)


def test_the_fingerprint_sees_one_changed_value() -> None:
    node = federated_data(cfg_of()).nodes[0]
    changed = type(node)(node.train_x.clone(), node.train_y, node.test_x, node.test_y)
    changed.train_x.view(-1)[7] += 1e-6
    assert fingerprint(changed) != fingerprint(node) and fingerprint(node) == fingerprint(node)


def test_the_augmentation_travels_in_the_manifest(tmp_path: Path) -> None:
    """CIFAR's crop-and-flip (a functools.partial of a testbeds.augment function) is rebuilt from JSON."""
    import functools

    from fedsam.partitions import FederatedData, NodeData
    from testbeds.augment import random_crop_flip

    x = torch.randn(4, 3, 8, 8)
    node = NodeData(x, torch.arange(4), x[:1], torch.arange(1))
    augment = functools.partial(random_crop_flip, padding=2, fill=(0.1, 0.2, 0.3))
    data = FederatedData("cifar10", [node, node], x[:0], torch.arange(0), 10, (3, 8, 8), augment)
    cfg = FedConfig(num_nodes=2, dataset="cifar10", partitioner="iid")
    export_partitions(cfg, tmp_path / "p", data=data)
    got = load_partitions(tmp_path / "p", [1], cfg).augment
    assert got is not None
    assert torch.equal(got(x, torch.Generator().manual_seed(0)), augment(x, torch.Generator().manual_seed(0)))


def test_a_folder_of_another_split_is_refused_and_left_alone(tmp_path: Path) -> None:
    export_partitions(cfg_of(), tmp_path / "parts")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "parts").iterdir()}
    assert export_partitions(cfg_of(), tmp_path / "parts")["split"]["seed"] == 3  # the same split: kept as it is
    with pytest.raises(ConfigError, match=r"out: the partitions were exported for another split \(seed: exported 3"):
        export_partitions(FedConfig(num_nodes=5, alpha=0.5, seed=4), tmp_path / "parts")
    with pytest.raises(ConfigError, match=r"partition-dir: .*another split \(alpha: exported 0.5, run 0.3"):
        load_partitions(tmp_path / "parts", [0], FedConfig(num_nodes=5, seed=3))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "parts").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="out: .* exists and is not a partition folder"):
        export_partitions(cfg_of(), tmp_path / "other")


def test_a_damaged_file_or_manifest_is_refused(tmp_path: Path) -> None:
    cfg = cfg_of()
    export_partitions(cfg, tmp_path / "parts")
    manifest = json.loads((tmp_path / "parts" / MANIFEST).read_text())
    manifest["fingerprints"][2] = "0" * 64
    (tmp_path / "parts" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="does not match its fingerprint"):
        load_partitions(tmp_path / "parts", [2], cfg)
    with pytest.raises(ConfigError, match="partition-dir: .* holds no readable manifest.json"):
        load_partitions(tmp_path / "nowhere", [0], cfg)


def test_reading_partitions_imports_no_data_library(tmp_path: Path) -> None:
    """The ClientApp's cold start: its modules and a partition read pull in neither datasets,
    flwr-datasets, scikit-learn, matplotlib nor the relay."""
    cfg = cfg_of()
    export_partitions(cfg, tmp_path / "parts")
    code = (
        "import sys\n"
        "from fedsam.config import FedConfig\n"
        "import fedsam.client_app\n"
        "from fedsam.partitions import load_partitions\n"
        f"load_partitions({str(tmp_path / 'parts')!r}, [0, 1], FedConfig(num_nodes=5, alpha=0.5, seed=3))\n"
        "heavy = ('datasets', 'flwr_datasets', 'sklearn', 'matplotlib', 'scipy', 'pandas', 'pyarrow', 'ray',"
        " 'fedsam.run', 'fedsam.server_app', 'fedsam.compare')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
