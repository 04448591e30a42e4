"""USEFUL's change of the training distribution (testbeds.useful) and its arms in `samsuite train`."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from suite_fixtures import kill_everywhere, strip

from experiments.train import TrainConfig, run_train
from shared.checkpoint import load_checkpoint
from shared.config import ConfigError
from shared.runio import RunDir
from testbeds import useful_plan


def two_groups() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Class 0: 6 confident correct outputs (fast) and 4 near-uniform ones (slow); class 1 likewise
    with 5 and 3; returns logits, labels and the slow examples' positions."""
    gen = torch.Generator().manual_seed(0)
    rows, labels, slow = [], [], []
    for c, (fast_n, slow_n) in enumerate(((6, 4), (5, 3))):
        for i in range(fast_n + slow_n):
            z = 0.05 * torch.randn(3, generator=gen, dtype=torch.float64)
            if i < fast_n:
                z[c] += 6.0
            else:
                slow.append(len(rows))
            rows.append(z)
            labels.append(c)
    return torch.stack(rows), torch.tensor(labels), slow


@pytest.mark.parametrize("factor", [2, 3])
def test_the_higher_loss_cluster_of_each_class_is_upsampled(factor: int) -> None:
    logits, labels, slow = two_groups()
    plan = useful_plan(logits, labels, 3, factor=factor, seed=0)
    assert torch.nonzero(plan.upsampled).flatten().tolist() == slow
    assert len(plan.order) == len(labels) + (factor - 1) * len(slow)
    counts = torch.bincount(plan.order, minlength=len(labels))
    assert counts.tolist() == [factor if i in slow else 1 for i in range(len(labels))]
    assert [(c["class"], c["size"], c["slow"]) for c in plan.classes] == [(0, 10, 4), (1, 8, 3), (2, 0, 0)]
    assert plan.classes[0]["slow_loss"] > plan.classes[0]["fast_loss"]
    assert plan.summary["upsampled_fraction"] == pytest.approx(7 / 18, abs=1e-4)


def test_a_class_without_two_distinct_outputs_is_left_alone_and_the_plan_is_seeded() -> None:
    logits, labels, _ = two_groups()
    logits[labels == 1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    plan = useful_plan(logits, labels, 3, seed=1)
    assert not plan.upsampled[labels == 1].any() and plan.classes[1]["slow"] == 0
    assert torch.equal(useful_plan(logits, labels, 3, seed=1).order, plan.order)


def test_a_factor_below_two_names_the_field() -> None:
    logits, labels, _ = two_groups()
    with pytest.raises(ValueError, match="^useful_factor: "):
        useful_plan(logits, labels, 3, factor=1)


def small(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    base = {"name": name, "out_dir": str(tmp_path), "epochs": 3, "model_options": {"width": 8}, "batch_size": 128,
            "optimizers": ["sgd", "sam"], "useful": True, "useful_epoch": 1, "seeds": [0, 1]}
    base.update(kw)
    return TrainConfig(**base)


def test_train_with_useful_adds_paired_arms_and_records_the_plan(tmp_path: Path) -> None:
    summary = run_train(small(tmp_path, "u"))
    rows = {r["optimizer"]: r for r in summary["results"]}
    assert list(rows) == ["sgd", "sam", "sgd+useful", "sam+useful"]
    units = {(u["seed"], u["optimizer"]): u["test_acc"] for u in summary["units"]}
    for name in ("sgd", "sam"):
        diffs = [units[(s, f"{name}+useful")] - units[(s, name)] for s in (0, 1)]
        assert rows[f"{name}+useful"]["useful_diff"] == pytest.approx(sum(diffs) / 2, abs=1e-4)
        assert rows[f"{name}+useful"]["useful_se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2, abs=1e-4)
        assert rows[name]["useful_diff"] is None
    plan = summary["useful"]["-/0"]
    n = plan["examples"]
    assert plan["new_size"] == n + plan["upsampled"] and 0 < plan["upsampled"] < n
    assert plan["epochs_vs_plain_run"] == pytest.approx((1 * n + 3 * plan["new_size"]) / (3 * n), abs=1e-4)
    # the plain arms are the same as in a run without USEFUL
    plain = run_train(small(tmp_path, "p", useful=False))
    assert [r["test_acc"] for r in plain["results"]] == [rows["sgd"]["test_acc"], rows["sam"]["test_acc"]]


def test_useful_and_saf_resume_exactly_after_a_kill_at_every_write(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The USEFUL split is recomputed on resume and SAF's buffer comes back from the checkpoint:
    a run killed at any write ends as the uninterrupted one."""

    def run(name: str) -> None:
        run_train(small(tmp_path, name, optimizers=["saf"], epochs=2, seeds=[0], batch_size=512,
                        model_options={"width": 4}, options={"saf": {"past": 1, "start_epoch": 1}}))

    def result(name: str) -> Any:
        state = load_checkpoint(tmp_path / name / "checkpoint.safetensors")
        weights = {k: v.tolist() for k, v in state["arms"]["saf+useful"]["model"].items()}
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return strip(RunDir(tmp_path / name).metrics()), weights, summary["useful"], [
            {k: r[k] for k in ("test_acc", "final_test_acc")} for r in summary["results"]]

    assert kill_everywhere(monkeypatch, run, result) >= 2 * 8


@pytest.mark.parametrize(("options", "field"), [({"useful_factor": 1}, "useful_factor"),
                                                ({"useful_epoch": 0}, "useful_epoch"),
                                                ({"useful_epoch": 9}, "useful_epoch")])
def test_bad_useful_settings_name_the_field(tmp_path: Path, options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        small(tmp_path, "b", **options)
    assert not (tmp_path / "b").exists()
