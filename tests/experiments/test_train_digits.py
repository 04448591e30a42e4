import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.train import TrainConfig, run_train
from shared.config import ConfigError


def small(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    base = {"name": name, "out_dir": str(tmp_path), "epochs": 2, "model_options": {"width": 8}, "batch_size": 128,
            "optimizers": ["sgd", "sam", "obf"]}
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_results_and_learns(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "a", epochs=3, lr=0.1))
    run = tmp_path / "a"
    for name in ("metrics.jsonl", "results.csv", "results.md", "curves.png", "summary.json", "config.yaml"):
        assert (run / name).exists(), name
    rows = {r["optimizer"]: r for r in summary["results"]}
    assert set(rows) == {"sgd", "sam", "obf"}
    for row in rows.values():
        assert row["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert rows["sgd"]["step_time_vs_sgd"] == 1.0
    assert rows["sam"]["step_time_vs_sgd"] > 1.0  # two passes
    saved = json.loads((run / "summary.json").read_text())
    assert saved["config"]["seeds"] == [0] and "torch" in saved["environment"]["versions"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 * 3


def test_a_changed_config_does_not_resume(tmp_path: Path) -> None:
    run_train(small(tmp_path, "r", epochs=1))
    with pytest.raises(ConfigError, match="different config"):
        run_train(small(tmp_path, "r", epochs=1, lr=0.2))
    assert run_train(small(tmp_path, "r", epochs=1, lr=0.2, resume=False))["config"]["lr"] == 0.2


def test_seeds_give_paired_differences_with_intervals(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "s", seeds=[0, 1, 2], optimizers=["sgd", "sam"], epochs=1))
    sgd, sam = summary["results"]
    units = [u for u in summary["units"]]
    assert len(units) == 3 * 2 and {u["seed"] for u in units} == {0, 1, 2}
    per_seed = {name: [u["test_acc"] for u in units if u["optimizer"] == name] for name in ("sgd", "sam")}
    diffs = np.array(per_seed["sam"]) - np.array(per_seed["sgd"])
    assert sam["diff_vs_sgd"] == pytest.approx(diffs.mean(), abs=1e-4)
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert sam["ci95_low"] == pytest.approx(diffs.mean() - half, abs=1e-4)
    assert sam["ci95_high"] == pytest.approx(diffs.mean() + half, abs=1e-4)
    assert sgd["diff_vs_sgd"] is None and sgd["test_acc_std"] == pytest.approx(np.std(per_seed["sgd"], ddof=1), abs=1e-4)
    # each seed its own initial weights, batches and validation split
    assert len({u["test_acc"] for u in units if u["optimizer"] == "sgd"}) > 1


def test_model_selection_uses_validation_never_test(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "v", epochs=3, optimizers=["sgd"]))
    records = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert summary["units"][0]["selected_epoch"] == best["epoch"]
    assert summary["results"][0]["test_acc"] == round(best["test_acc"], 4)
    assert summary["results"][0]["final_test_acc"] == round(records[-1]["test_acc"], 4)


def test_label_noise_flips_the_training_labels_only(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "n", epochs=1, optimizers=["sgd"], label_noise=0.4, seeds=[3]))
    assert summary["label_noise_flipped"] == {"-/3": pytest.approx(0.4, abs=1e-3)}
    clean = run_train(small(tmp_path, "c", epochs=1, optimizers=["sgd"], seeds=[3]))
    assert clean["label_noise_flipped"] == {"-/3": 0.0}


def test_mnist1d_with_the_paper_cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMSUITE_CACHE", str(tmp_path / "cache"))
    summary = run_train(small(tmp_path, "m", dataset="mnist1d", model="cnn1d", model_options={}, epochs=10,
                              batch_size=32, dataset_options={"num_samples": 1000}, optimizers=["sgd", "sam"]))
    assert all(r["test_acc"] > 0.2 for r in summary["results"])  # 10 classes: chance is 0.1


def test_leave_one_domain_out_table(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "d", protocol="leave-one-domain-out", dataset="rotated-digits",
                              domains=[0, 45], seeds=[0, 1], optimizers=["sgd", "sam"], epochs=1))
    lodo = summary["lodo"]
    assert [list(r) for r in lodo] == [["method", "0", "45", "avg"]] * 2 and [r["method"] for r in lodo] == ["sgd", "sam"]
    for row in lodo:
        assert row["avg"] == pytest.approx((row["0"] + row["45"]) / 2, abs=2e-4)
    units = summary["units"]
    assert sorted({(u["fold"], u["seed"]) for u in units}) == [("0", 0), ("0", 1), ("45", 0), ("45", 1)]
    mean_avg = np.mean([np.mean([u["test_acc"] for u in units if u["optimizer"] == "sgd" and u["seed"] == s])
                        for s in (0, 1)])
    assert summary["results"][0]["test_acc"] == pytest.approx(mean_avg, abs=1e-4)
    assert (tmp_path / "d" / "lodo.md").is_file() and set(summary["domains"]) == {"0", "15", "30", "45", "60", "75"}


def test_bad_config_is_rejected_before_training(tmp_path: Path, cli) -> None:
    with pytest.raises(ConfigError, match=r"optimizers\[1\]: unknown optimizer 'samm'"):
        small(tmp_path, "x", optimizers=["sgd", "samm"])
    with pytest.raises(ConfigError, match="options.gsm"):
        small(tmp_path, "x", options={"gsm": {}})
    result = cli("train", "epochs=0", f"out_dir={tmp_path}")
    assert result.exit_code == 2 and "epochs: expected an integer >= 1" in result.output
    result = cli("train", "lr=fast")
    assert result.exit_code == 2 and "lr: expected a number" in result.output


def test_cli_train_runs(tmp_path: Path, cli) -> None:
    result = cli("train", f"out_dir={tmp_path}", "name=cli", "epochs=1", "model_options.width=4", "optimizers=[sgd, gsam]")
    assert result.exit_code == 0, result.output
    assert "| gsam |" in result.output


def test_a_grid_of_variants_is_chosen_on_validation(tmp_path: Path) -> None:
    labels = ["sgd", "sam:rho=0.01", "sam:rho=1e-1"]
    summary = run_train(small(tmp_path, "g", optimizers=labels, seeds=[0, 1], epochs=1))
    rows = {r["optimizer"]: r for r in summary["results"]}
    assert list(rows) == [*labels, "sam (best on val)"]
    units = summary["units"]
    for seed, chosen in zip([0, 1], summary["best_on_validation"]["sam"], strict=True):
        val = {u["optimizer"]: u["val_acc"] for u in units if u["seed"] == seed and u["optimizer"] != "sgd"}
        assert val[chosen] == max(val.values())
    picked = [next(u["test_acc"] for u in units if u["seed"] == s and u["optimizer"] == c)
              for s, c in zip([0, 1], summary["best_on_validation"]["sam"], strict=True)]
    assert rows["sam (best on val)"]["test_acc"] == pytest.approx(np.mean(picked), abs=1e-4)
    with pytest.raises(ConfigError, match=r"optimizers\[1\]: 'sam:rho': expected NAME or NAME:key=value"):
        small(tmp_path, "x", optimizers=["sgd", "sam:rho"])
    with pytest.raises(ConfigError, match=r"optimizers \(sam:bogus=1\): bogus: unknown option of SAM"):
        small(tmp_path, "x", optimizers=["sgd", "sam:bogus=1"])


def test_label_noise_leaves_validation_and_test_labels_clean(tmp_path: Path) -> None:
    from experiments.train import Testbed

    noisy = Testbed(small(tmp_path, "x", label_noise=0.4)).unit(None, 3)
    clean = Testbed(small(tmp_path, "x")).unit(None, 3)
    assert torch.equal(noisy.val[1], clean.val[1]) and torch.equal(noisy.test[1], clean.test[1])
    flipped = (noisy.train[1] != clean.train[1]).float().mean().item()
    assert torch.equal(noisy.train[0], clean.train[0]) and flipped == pytest.approx(0.4, abs=1e-3)


def test_fine_tune_protocol_pretrains_then_tunes_every_optimizer_from_it(tmp_path: Path) -> None:
    """Every arm starts from the base optimizer's pre-trained model (so pre-training longer changes
    every arm), fine-tunes on the target domain and is tested on the other domains' held-out parts."""
    def tune(name: str, pretrain_epochs: int) -> dict:
        return run_train(small(tmp_path, name, protocol="fine-tune", dataset="rotated-digits", target_domain=45,
                               pretrain_domains=[0, 15], pretrain_epochs=pretrain_epochs, seeds=[0],
                               optimizers=["sgd", "tram-init"], epochs=1))

    one, three = tune("f1", 1), tune("f3", 3)
    assert [r["optimizer"] for r in one["results"]] == ["sgd", "tram-init"] and one["lodo"] is None
    for a, b in zip(one["results"], three["results"]):
        assert a["test_acc"] != b["test_acc"]
    assert "fine-tuned on '45'" in (tmp_path / "f1" / "results.md").read_text()
    with pytest.raises(ConfigError, match="^target_domain: protocol=fine-tune needs it"):
        small(tmp_path, "x", protocol="fine-tune", dataset="rotated-digits")
    with pytest.raises(ConfigError, match="^target_domain: rotated-digits has no domain '50'"):
        run_train(small(tmp_path, "x", protocol="fine-tune", dataset="rotated-digits", target_domain=50))
    with pytest.raises(ConfigError, match="^pretrain_domains: the target domain '45'"):
        run_train(small(tmp_path, "x", protocol="fine-tune", dataset="rotated-digits", target_domain=45,
                        pretrain_domains=[0, 45]))
    assert not (tmp_path / "x").exists()


def test_paper_scale_cifar_config_runs_on_tiny_data_in_the_hub_format(tmp_path: Path) -> None:
    """The CIFAR-10 ResNet-18 configs of SAF, MESA and USEFUL, with their real loading code and the
    crop-and-flip augmentation, on a tiny data set with the `uoft-cs/cifar10` schema."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "fedsam"))
    from test_data import cifar_dict

    cifar_dict(10, {"train": 4, "test": 1}, fine=False, seed=0).save_to_disk(tmp_path / "data" / "cifar10")
    from shared.config import load_config

    common = [f"data_dir={tmp_path / 'data'}", f"out_dir={tmp_path}", "epochs=1", "batch_size=20", "seeds=[0]",
              "device=cpu"]
    for name, extra in (("paper_cifar10_saf_mesa.yaml", ["optimizers=[saf]"]),  # one arm each: ResNet-18 on CPU
                        ("paper_cifar10_useful.yaml", ["optimizers=[sgd]", "useful_epoch=1"])):
        cfg = load_config(TrainConfig, Path("experiments/configs/train") / name, common + extra)
        assert cfg.augment and cfg.model == "resnet18" and cfg.model_options == {"norm": "batch"}
        summary = run_train(cfg)
        assert all(0.0 <= r["test_acc"] <= 1.0 for r in summary["results"])


def test_augment_and_device_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^augment: 'digits' has no train-time augmentation"):
        run_train(small(tmp_path, "a", augment=True))
    with pytest.raises(ConfigError, match="^device: unknown device 'gpu0'"):
        small(tmp_path, "a", device="gpu0")
    assert not (tmp_path / "a").exists()
