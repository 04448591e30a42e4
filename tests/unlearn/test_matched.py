"""Matched efficacy: the budget chosen from validation values by hand, the settings' bad input, the
validation split checked against the test questions, and a calibration that reads the validation
split only (it gives the same curve when the test tables are replaced)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset
from suite_fixtures import unlearn_settings

from shared.config import ConfigError, from_dict
from shared.runio import RunDir
from unlearn import pipeline
from unlearn.benchmarks import build_toy, load_benchmark
from unlearn.eval import available_metrics
from unlearn.matched import MatchedSettings, check_validation, choose_budget, validation_view
from unlearn.pipeline import RunConfig

CURVE = [{"step": 0, "forget_acc_cloze_val": 0.80, "utility_acc_cloze_val": 0.90},
         {"step": 5, "forget_acc_cloze_val": 0.50, "utility_acc_cloze_val": 0.85},
         {"step": 10, "forget_acc_cloze_val": 0.31, "utility_acc_cloze_val": 0.70},
         {"step": 15, "forget_acc_cloze_val": 0.20, "utility_acc_cloze_val": 0.40}]


def test_the_smallest_budget_in_the_band_above_the_floor_is_chosen() -> None:
    settings = MatchedSettings(budgets=[5, 10, 15], band=0.05)
    got = choose_budget(CURVE, settings, target=0.26)
    assert got["chosen"] == 10  # 0.31 - 0.26 is 0.05 up to rounding: inside
    assert got["band"] == [pytest.approx(0.21), pytest.approx(0.31)] and [r["step"] for r in got["rows"]] == [5, 10, 15]
    assert choose_budget(CURVE, replace(settings, floor=0.75), target=0.26)["chosen"] is None  # utility 0.70 < 0.75
    assert choose_budget(CURVE, replace(settings, band=0.1), target=0.22)["chosen"] == 10
    assert choose_budget(CURVE, replace(settings, band=0.01), target=0.2)["chosen"] == 15
    assert choose_budget(CURVE, replace(settings, utility=None, floor=0.99), target=0.5)["chosen"] == 5
    with pytest.raises(ValueError, match=r"no evaluation at the budgets \[20\]"):
        choose_budget(CURVE, MatchedSettings(budgets=[5, 20]), target=0.3)
    assert MatchedSettings(budgets=[10, 15, 40]).every == 5


@pytest.mark.parametrize("settings, message", [
    ({"band": 1.5}, r"matched.band: expected a fraction in \[0, 1\], got 1.5"),
    ({"floor": -0.1}, r"matched.floor: expected a fraction in \[0, 1\], got -0.1"),
    ({"target": 2}, r"matched.target: expected a fraction in \[0, 1\], got 2"),
    ({"budgets": []}, "matched.budgets: expected a list of step counts >= 1"),
    ({"budgets": [10, 5]}, r"matched.budgets: expected increasing step counts, got \[10, 5\]"),
    ({"budgets": [0, 5]}, "matched.budgets: expected a list of step counts >= 1"),
])
def test_bad_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MatchedSettings(**settings)


def test_the_validation_split_must_not_share_test_questions() -> None:
    bench = build_toy(0)
    check_validation(bench, MatchedSettings(), available_metrics(bench))  # the toy's fourth wording: disjoint
    leaky = replace(bench, mc={**bench.mc, "forget_val": bench.mc["forget"]})
    with pytest.raises(ConfigError, match="matched: the validation split mc/forget_val shares 50 question"):
        check_validation(leaky, MatchedSettings(), available_metrics(leaky))
    none = replace(bench, mc={k: v for k, v in bench.mc.items() if not k.endswith("_val")})
    with pytest.raises(ConfigError, match="matched.metric: toy has no validation split for forget_acc_cloze"):
        check_validation(none, MatchedSettings(), available_metrics(none))
    assert set(validation_view(bench).mc) == {"forget_val", "utility_val"} and validation_view(bench).muse == {}


def _calibration(bench_dir: Path, tmp_path: Path, bench) -> dict:
    cfg = from_dict(RunConfig, unlearn_settings(bench_dir, tmp_path, matched={"budgets": [1, 2], "band": 1.0}))
    ctx = pipeline._Run(cfg, RunDir(tmp_path), "cpu", bench, matched_target=0.3)
    retain = list(bench.corpora["retain"]["text"])
    return pipeline._calibrate(ctx, "npo", cfg.method_config(0, 0), tmp_path / "unit", bench.models["target"], retain)


def test_the_calibration_reads_the_validation_split_only(unlearn_bench: Path, tmp_path: Path) -> None:
    """Replacing the test tables (forget and utility questions) changes nothing the calibration computes;
    replacing the validation tables does."""
    bench = load_benchmark(str(unlearn_bench))
    want = _calibration(unlearn_bench, tmp_path / "a", bench)
    assert want["chosen"] == 1 and [r["step"] for r in want["curve"]] == [0, 1, 2]
    scrambled = {name: Dataset.from_list([{**row, "answer": (row["answer"] + 1) % 4} for row in table])
                 for name, table in bench.mc.items()}
    test_changed = replace(bench, mc={**bench.mc, "forget": scrambled["forget"], "utility": scrambled["utility"]})
    assert _calibration(unlearn_bench, tmp_path / "b", test_changed)["curve"] == want["curve"]
    val_changed = replace(bench, mc={**bench.mc, "forget_val": scrambled["forget_val"]})
    assert _calibration(unlearn_bench, tmp_path / "c", val_changed)["curve"] != want["curve"]


def test_a_run_trains_each_method_for_its_chosen_budget(unlearn_bench: Path, tmp_path: Path) -> None:
    cfg = from_dict(RunConfig, unlearn_settings(unlearn_bench, tmp_path, matched={"budgets": [1, 3], "band": 1.0}))
    summary = pipeline.run_pipeline(cfg)
    assert [u["train"]["steps"] for u in summary["units"]] == [1, 1]  # band 1: the first budget is in it
    assert (tmp_path / "small" / "calibration.md").read_text().count("| 1 |") == 2
    assert summary["unmatched"] == [] and summary["calibration"][0]["steps"] == 1


def test_a_band_no_method_reaches_stops_the_run_with_the_calibration_written(unlearn_bench: Path, tmp_path: Path
                                                                             ) -> None:
    from shared.errors import RunError

    cfg = from_dict(RunConfig, unlearn_settings(unlearn_bench, tmp_path, matched={
        "budgets": [1], "band": 0.0, "target": 1.0}))
    with pytest.raises(RunError, match="matched: no method reached the band at any budget"):
        pipeline.run_pipeline(cfg)
    assert "not reached" in (tmp_path / "small" / "calibration.md").read_text()


def test_matching_without_a_retrained_model_needs_a_target(unlearn_bench: Path, tmp_path: Path) -> None:
    cfg = from_dict(RunConfig, unlearn_settings(unlearn_bench, tmp_path, retrain=None, matched={"budgets": [1]}))
    with pytest.raises(ConfigError, match="matched.target: there is no retrained model to match"):
        pipeline.check_run(cfg, pipeline._benchmark(cfg))
