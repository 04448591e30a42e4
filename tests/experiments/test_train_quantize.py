"""`samsuite train` with the domain-generalization members and LSQ quantization-aware training:
the arms train the quantized model from the unit's full-precision one, GAQAT freezes step sizes,
a killed run resumes exactly, bad `quantize` settings are refused before any work."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import train
from experiments.train import TrainConfig, _quantized, _unit_model, run_train
from shared.config import ConfigError
from shared.quant import QuantScale
from shared.runio import RunDir
from tests.experiments.test_train_digits import small

LODO = {"protocol": "leave-one-domain-out", "dataset": "rotated-digits", "domains": [45], "seeds": [0]}


def test_dg_members_train_on_leave_one_domain_out(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "dg", optimizers=["sgd", "sagm", "udim"], epochs=1, **LODO))
    assert [r["method"] for r in summary["lodo"]] == ["sgd", "sagm", "udim"]
    assert all(0.1 < r["test_acc"] <= 1 for r in summary["results"])


def test_quantized_arms_start_from_the_full_precision_model(tmp_path: Path) -> None:
    cfg = small(tmp_path, "q", optimizers=["sgd", "sagm", "gaqat"], quantize={"bits": 4, "fp_epochs": 1}, **LODO)
    bed = train.Testbed(cfg)
    data = bed.unit("45", 0)
    model_fn, init = _unit_model(cfg, data)
    net = model_fn()
    scales = [p for p in net.parameters() if isinstance(p, QuantScale)]
    assert scales and all(k in init for k, _ in net.named_parameters())
    net.load_state_dict(init)
    assert all(bool(s > 0) for s in scales)  # LSQ's init from the data, not the placeholder
    fp_fn, fp_init = _unit_model(dataclasses.replace(cfg, quantize={}, optimizers=["sgd"]), data)
    trained = _quantized(cfg, data, (fp_fn, fp_init))[1]
    assert torch.equal(trained["features.0.weight"], init["features.0.weight"])  # deterministic: same FP training
    assert not torch.equal(fp_init["features.0.weight"], init["features.0.weight"])  # fp_epochs trained it
    summary = run_train(cfg)
    records = RunDir(tmp_path / "q").metrics()
    assert all(0 <= r["gaqat_frozen_fraction"] <= 1 for r in records if r["optimizer"] == "gaqat")
    assert all("gaqat_frozen_fraction" not in r for r in records if r["optimizer"] != "gaqat")
    assert [r["method"] for r in summary["lodo"]] == ["sgd", "sagm", "gaqat"]
    assert all(0.1 < r["test_acc"] <= 1 for r in summary["results"])


class Killed(Exception):
    pass


def test_a_killed_quantized_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GAQAT's signs and frozen step sizes and the quantizers' state travel with the checkpoint."""
    def cfg(out: str) -> Any:
        return small(tmp_path / out, "r", optimizers=["gaqat:window=2,interval=1,threshold=0.6"], epochs=2,
                     quantize={"bits": 3, "fp_epochs": 1}, **LODO)

    run_train(cfg("ref"))
    want = [{k: v for k, v in r.items() if "time" not in k} for r in RunDir(tmp_path / "ref" / "r").metrics()]
    real = RunDir.save_checkpoint

    def save_then_die(run: RunDir, state: dict[str, Any]) -> None:
        real(run, state)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(RunDir, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_train(cfg("k"))
    run_train(cfg("k"))
    got = [{k: v for k, v in r.items() if "time" not in k} for r in RunDir(tmp_path / "k" / "r").metrics()]
    assert len(got) == 2 and got == want


def test_bad_quantize_settings_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^quantize\.bits: expected an integer in 2\.\.8"):
        small(tmp_path, "x", quantize={"bits": 9})
    with pytest.raises(ConfigError, match=r"^quantize\.bits: expected an integer in 2\.\.8 .*got none"):
        small(tmp_path, "x", quantize={"act_bits": 4})
    with pytest.raises(ConfigError, match=r"^quantize\.bitz: unknown key\. Allowed: bits, act_bits"):
        small(tmp_path, "x", quantize={"bitz": 4})
    with pytest.raises(ConfigError, match=r"^quantize\.fp_epochs: expected an integer >= 0"):
        small(tmp_path, "x", quantize={"bits": 4, "fp_epochs": -1})
    with pytest.raises(ConfigError, match=r"^optimizers\[1\]: gaqat adapts the step sizes of a quantized model"):
        small(tmp_path, "x", optimizers=["sgd", "gaqat"])
    with pytest.raises(ConfigError, match=r"options\.gaqat\.window: expected an integer >= 2"):
        small(tmp_path, "x", optimizers=["gaqat"], quantize={"bits": 4}, options={"gaqat": {"window": 1}})
    assert not (tmp_path / "x").exists()


def test_compare_gives_paired_differences_between_any_two_methods(tmp_path: Path) -> None:
    labels = ["sgd", "sam", "sagm:alpha=0.001", "sagm:alpha=0.05"]
    summary = run_train(small(tmp_path, "c", optimizers=labels, seeds=[0, 1], epochs=1,
                              compare=[["sagm", "sam"], ["sam", "sgd"]]))
    acc = {(u["seed"], u["optimizer"]): u["test_acc"] for u in summary["units"]}
    chosen = summary["best_on_validation"]["sagm"]
    diffs = [acc[(s, c)] - acc[(s, "sam")] for s, c in zip([0, 1], chosen)]
    first, second = summary["pairs"]
    assert (first["method"], first["reference"]) == ("sagm", "sam")
    assert first["diff"] == pytest.approx(sum(diffs) / 2, abs=1e-4) and first["wins"] == sum(d > 0 for d in diffs)
    sam_vs_sgd = next(r for r in summary["results"] if r["optimizer"] == "sam")["diff_vs_sgd"]
    assert second["diff"] == pytest.approx(sam_vs_sgd, abs=1e-4)
    assert (tmp_path / "c" / "pairs.md").is_file()
    with pytest.raises(ConfigError, match=r"^compare\[0\]: 'udim' is not trained in this run\. Allowed: sgd, sam"):
        small(tmp_path, "x", optimizers=["sgd", "sam"], compare=[["udim", "sam"]])
    with pytest.raises(ConfigError, match=r"^compare\[0\]: expected a pair"):
        small(tmp_path, "x", optimizers=["sgd", "sam"], compare=[["sam"]])


def test_paper_scale_pacs_configs_run_on_a_tiny_domainbed_folder(tmp_path: Path) -> None:
    """The PACS configs with their real loading code (a DomainBed folder, an ImageNet ResNet whose weights come
    from a local file in timm's layout) on 4 tiny domains of 2 classes."""
    from safetensors.torch import save_file

    from shared.config import load_config
    from testbeds import build_model
    from tests.testbeds.test_domains import make_folder

    root = make_folder(tmp_path / "PACS", domains=("art_painting", "cartoon", "photo", "sketch"), per_class=4)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("resnet18-imagenet", 1000, (3, 32, 32)).state_dict().items()},
              str(weights))
    common = [f"dataset_options.root={root}", "dataset_options.image_size=32", "model=resnet18-imagenet",
              f"model_options.weights={weights}", f"out_dir={tmp_path}", "epochs=1", "batch_size=8", "seeds=[0]",
              "domains=[sketch]", "device=cpu"]
    for name, extra in (("paper_pacs_dg.yaml", ["options.udim.warmup_steps=0"]),
                        ("paper_pacs_gaqat.yaml", ["quantize.fp_epochs=1"])):
        cfg = load_config(TrainConfig, Path("experiments/configs/train") / name, common + extra)
        summary = run_train(cfg)
        assert [r["method"] for r in summary["lodo"]] == cfg.optimizers
        assert summary["pairs"] and all(0.0 <= r["test_acc"] <= 1.0 for r in summary["results"])
