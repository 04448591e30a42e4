"""Matched efficacy: the budget chosen from validation values by hand, the settings' bad input, the
validation split checked against the test questions, a split held out of a benchmark without one (WMDP,
MUSE), the validation metrics against the metrics on the held-out tables, and a calibration that reads
the validation split only (it gives the same curve when the test tables are replaced)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset
from suite_fixtures import unlearn_settings

from shared.config import ConfigError, from_dict
from shared.runio import RunDir
from unlearn import pipeline
from unlearn.benchmarks import Benchmark, build_toy, load_benchmark, save_benchmark
from unlearn.eval import VALIDATION_METRICS, available_metrics, evaluate
from unlearn.matched import MatchedSettings, check_validation, choose_budget, split_validation, validation_view
from unlearn.models import load_model
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
    ({"split": 1.0}, "matched.split: expected a fraction strictly between 0 and 1"),
    ({"split": 0.0}, "matched.split: expected a fraction strictly between 0 and 1"),
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
    view = validation_view(bench, MatchedSettings().validation_metrics())
    assert set(view.mc) == {"forget_val", "utility_val"} and dict(view.muse) == {} and dict(view.corpora) == {}


def _without_validation(bench: Benchmark) -> Benchmark:
    """`bench` as WMDP and MUSE come: no validation tables; one forget question asked twice."""
    forget = bench.mc["forget"]
    twice = Dataset.from_list([*forget, forget[0]])
    return replace(bench, mc={"forget": twice, "utility": bench.mc["utility"]})


def test_a_split_holds_out_a_fraction_of_the_distinct_questions() -> None:
    bench = _without_validation(build_toy(0))
    split = split_validation(bench, 0.2, seed=0)
    assert set(split.mc) == {"forget", "utility", "forget_val", "utility_val"}
    assert {k for k in split.muse if k.endswith("_val")} == {"verbmem_forget_val", "knowmem_forget_qa_val",
                                                             "knowmem_retain_qa_val"}
    for section, key, column in [("mc", "forget", "question"), ("mc", "utility", "question"),
                                 ("muse", "knowmem_retain_qa", "question"), ("muse", "verbmem_forget", "prompt")]:
        whole = getattr(bench, section)[key]
        test, val = getattr(split, section)[key], getattr(split, section)[key + "_val"]
        distinct = set(whole[column])
        assert len(set(val[column])) == round(0.2 * len(distinct)), key
        assert not set(val[column]) & set(test[column]) and len(val) + len(test) == len(whole), key
        assert list(test[column]) == [q for q in whole[column] if q not in set(val[column])], key  # in order
    asked_twice = bench.mc["forget"][0]["question"]
    sides = [asked_twice in split.mc[k]["question"] for k in ("forget", "forget_val")]
    assert sorted(sides) == [False, True]  # both copies on one side
    again, other = split_validation(bench, 0.2, seed=0), split_validation(bench, 0.2, seed=1)
    assert again.mc["utility_val"]["question"] == split.mc["utility_val"]["question"]
    assert other.mc["utility_val"]["question"] != split.mc["utility_val"]["question"]
    check_validation(split, MatchedSettings(split=0.2), available_metrics(split))
    with pytest.raises(ConfigError, match="matched.split: toy has a validation split already"):
        split_validation(build_toy(0), 0.2, seed=0)
    with pytest.raises(ConfigError, match="set matched.split, e.g. 0.2"):
        check_validation(bench, MatchedSettings(), available_metrics(bench))


def test_a_split_loads_nothing_until_a_table_is_read() -> None:
    loaded = []
    toy = build_toy(0)

    def loader(key: str):
        return lambda: loaded.append(key) or toy.mc[key]

    split = split_validation(Benchmark("lazy", mc={"forget": loader("forget"), "utility": loader("utility")}), 0.5, 0)
    assert loaded == [] and "forget_val" in split.mc
    assert len(split.mc["forget_val"]) + len(split.mc["forget"]) == len(toy.mc["forget"]) and loaded == ["forget"]


def test_the_validation_metrics_are_the_metrics_on_the_held_out_tables(unlearn_bench: Path) -> None:
    """knowmem_f_val, verbmem_f_val and forget_acc_cloze_val against the plain metrics on a benchmark made of
    the validation tables; asked for together with the test metric, each keeps its own generations."""
    bench = split_validation(_without_validation(load_benchmark(str(unlearn_bench))), 0.3, seed=0)
    model, tokenizer = load_model(bench.models["target"])
    names = ["knowmem_f", "verbmem_f", "forget_acc_cloze"]
    assert {n + "_val" for n in names} <= set(VALIDATION_METRICS)
    got = evaluate(model, tokenizer, bench, metrics=[*names, *(n + "_val" for n in names)], batch_size=4)
    held = Benchmark("held", mc={"forget": bench.mc["forget_val"]}, muse={
        "knowmem_forget_qa": bench.muse["knowmem_forget_qa_val"], "knowmem_forget_qa_icl": bench.muse[
            "knowmem_forget_qa_icl"], "verbmem_forget": bench.muse["verbmem_forget_val"]})
    want = evaluate(model, tokenizer, held, metrics=names, batch_size=4)
    assert {n: got[n + "_val"] for n in names} == want
    assert got["knowmem_f"] == evaluate(model, tokenizer, bench, metrics=["knowmem_f"], batch_size=4)["knowmem_f"]
    view = validation_view(bench, ["knowmem_f_val"])
    assert set(view.muse) == {"knowmem_forget_qa_val", "knowmem_forget_qa_icl"} and dict(view.mc) == {}


def test_a_run_on_a_benchmark_without_a_validation_split_holds_one_out(unlearn_bench: Path, tmp_path: Path) -> None:
    """WMDP and MUSE have no validation wording: matched.split holds out questions, the reported metrics
    are on the rest, and the run's stage keys say so."""
    bench = _without_validation(load_benchmark(str(unlearn_bench)))
    folder = save_benchmark(bench, tmp_path / "no-val")
    settings = unlearn_settings(folder, tmp_path, methods=[{"objective": "npo"}], relearn={
        "n_samples": 2, "draws": 1, "lr": 1e-3, "steps": 1, "batch_size": 2, "max_length": 96, "eval_every": 1})
    with pytest.raises(ConfigError, match="matched.metric: toy has no validation split for forget_acc_cloze"):
        pipeline.check_run(from_dict(RunConfig, {**settings, "matched": {"budgets": [1]}}),
                           pipeline._benchmark(from_dict(RunConfig, {**settings, "matched": {"budgets": [1]}})))
    cfg = from_dict(RunConfig, {**settings, "matched": {"budgets": [1, 2], "band": 1.0, "split": 0.3}})
    summary = pipeline.run_pipeline(cfg)
    assert summary["units"][0]["train"]["steps"] == 1
    unit = tmp_path / "small" / "npo" / "seed0"
    key = json.loads((unit / "unlearned.json").read_text())["key"]["benchmark"]
    assert key["validation"] == {"split": 0.3, "seed": 0}
    test_questions = pipeline._benchmark(cfg).mc["forget"]
    assert len(test_questions) < len(bench.mc["forget"])


def _calibration(bench_dir: Path, tmp_path: Path, bench, **matched) -> dict:
    cfg = from_dict(RunConfig, unlearn_settings(bench_dir, tmp_path, matched={"budgets": [1, 2], "band": 1.0,
                                                                              **matched}))
    ctx = pipeline._Run(cfg, RunDir(tmp_path), "cpu", bench, matched_target=0.3)
    retain = list(bench.corpora["retain"]["text"])
    return pipeline._calibrate(ctx, "npo", cfg.method_config(0, 0), tmp_path / "unit", bench.models["target"], retain)


def test_the_calibration_reads_the_validation_split_only(unlearn_bench: Path, tmp_path: Path) -> None:
    """Replacing the test tables (forget and utility questions) changes nothing the calibration computes;
    replacing the validation tables does."""
    bench = load_benchmark(str(unlearn_bench))
    want = _calibration(unlearn_bench, tmp_path / "a", bench)
    assert want["chosen"] == 1 and [r["step"] for r in want["curve"]] == [0, 1]  # it stops at the chosen budget
    scrambled = {name: Dataset.from_list([{**row, "answer": (row["answer"] + 1) % 4} for row in table])
                 for name, table in bench.mc.items()}
    test_changed = replace(bench, mc={**bench.mc, "forget": scrambled["forget"], "utility": scrambled["utility"]})
    assert _calibration(unlearn_bench, tmp_path / "b", test_changed)["curve"] == want["curve"]
    val_changed = replace(bench, mc={**bench.mc, "forget_val": scrambled["forget_val"]})
    assert _calibration(unlearn_bench, tmp_path / "c", val_changed)["curve"] != want["curve"]


def test_an_interrupted_calibration_goes_on_from_its_last_budget(unlearn_bench: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint at every budget: killed during the evaluation at step 2, the calibration resumes from step 1
    and ends with the curve of one that was never interrupted."""
    bench = load_benchmark(str(unlearn_bench))
    never = {"budgets": [1, 2, 3], "band": 0.0, "target": 1.0}  # no budget fits: it runs to the last
    want = _calibration(unlearn_bench, tmp_path / "a", bench, **never)
    plain = pipeline.benchmark_eval_fn

    def killed_at_2(*args, **kwargs):
        inner = plain(*args, **kwargs)
        return lambda model, step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else inner(model, step)

    monkeypatch.setattr(pipeline, "benchmark_eval_fn", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        _calibration(unlearn_bench, tmp_path / "b", bench, **never)
    monkeypatch.setattr(pipeline, "benchmark_eval_fn", plain)
    got = _calibration(unlearn_bench, tmp_path / "b", bench, **never)
    assert got["curve"] == want["curve"] and [r["step"] for r in got["curve"]] == [0, 1, 2, 3]
    records = [json.loads(line) for line in (tmp_path / "b" / "unit" / "calibration" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # step 1 trained once
    assert json.loads((tmp_path / "b" / "unit" / "calibration" / "summary.json").read_text())["resumed_from"] == 1
    assert not list((tmp_path / "b" / "unit" / "calibration").glob("checkpoint.*"))


def test_a_run_trains_each_method_for_its_chosen_budget(unlearn_bench: Path, tmp_path: Path) -> None:
    """Band 1: the first budget is in it. The calibration stops there, and with a constant lr its model is
    the unit's: the same unlearned values as a plain run of that many steps, without training again."""
    cfg = from_dict(RunConfig, unlearn_settings(unlearn_bench, tmp_path, matched={"budgets": [1, 3], "band": 1.0}))
    summary = pipeline.run_pipeline(cfg)
    assert [u["train"]["steps"] for u in summary["units"]] == [1, 1]
    unit = tmp_path / "small" / "npo+sam" / "seed0"
    calibration = json.loads((unit / "calibration.json").read_text())
    assert calibration["reusable"] and [r["step"] for r in calibration["curve"]] == [0, 1]
    assert json.loads((unit / "unlearned.json").read_text())["reused_calibration"] and not (unit / "train").exists()
    assert not list((unit / "calibration").glob("checkpoint.*"))
    plain = pipeline.run_pipeline(from_dict(RunConfig, unlearn_settings(
        unlearn_bench, tmp_path, name="plain", unlearn={**unlearn_settings(unlearn_bench, tmp_path)["unlearn"],
                                                        "steps": 1})))
    assert [u["unlearned"] for u in plain["units"]] == [u["unlearned"] for u in summary["units"]]
    # the attack's step 0 is the unit's evaluation after unlearning, equal to evaluating the saved model
    model, tokenizer = load_model(str(unit / "model"))
    curve = summary["units"][1]["curve"][0]
    bench = load_benchmark(str(unlearn_bench))
    assert evaluate(model, tokenizer, bench, metrics=[k for k in curve if k != "step" and not k.endswith("_std")],
                    max_samples=4, batch_size=8) == {k: v for k, v in curve.items() if k != "step" and
                                                     not k.endswith("_std")}
    assert (tmp_path / "small" / "calibration.md").read_text().count("| 1 |") == 2
    assert summary["unmatched"] == [] and summary["calibration"][0]["steps"] == 1
    # the profile: every stage's time, over all methods and per method, training + evaluation <= the stage
    profile = {(r["method"], r["stage"]): r for r in summary["profile"]}
    assert [s for m, s in profile if m == "all"] == ["references", "calibration", "unlearning", "relearn"]
    assert profile["all", "unlearning"]["runs"] == "2" and profile["npo+sam", "relearn"]["runs"] == "1"
    assert sum(int(r["share"][:-1]) for r in summary["profile"] if r["method"] == "all") == pytest.approx(100, abs=2)
    for unit in summary["units"]:
        for stage, t in unit["time"].items():
            trained = stage != "unlearning"  # the calibration's model: not trained again
            assert (0 < t["train_s"]) == trained and 0 < t["eval_s"] and t["train_s"] + t["eval_s"] <= t["total_s"]
    assert "| all | unlearning | 2 |" in (tmp_path / "small" / "profile.md").read_text()


def test_a_checkpoint_left_by_other_settings_does_not_stop_the_run(unlearn_bench: Path, tmp_path: Path) -> None:
    """A calibration interrupted under other settings (here: another lr) leaves a checkpoint; the run with the
    new settings discards it and calibrates afresh instead of refusing to resume it."""
    from unlearn.train import UnlearnConfig, unlearn

    settings = unlearn_settings(unlearn_bench, tmp_path, methods=[{"objective": "npo"}], relearn={
        "n_samples": 2, "draws": 1, "lr": 1e-3, "steps": 1, "batch_size": 2, "max_length": 96, "eval_every": 1},
        matched={"budgets": [1, 2], "band": 1.0})
    pipeline.run_pipeline(from_dict(RunConfig, {**settings, "unlearn": {**settings["unlearn"], "lr": 5e-4}}))
    bench = load_benchmark(str(unlearn_bench))
    model, tokenizer = load_model(bench.models["target"])
    unit = tmp_path / "small" / "npo" / "seed0"
    unlearn(model, tokenizer, list(bench.corpora["forget"]["text"]), list(bench.corpora["retain"]["text"]),
            UnlearnConfig(objective="npo", lr=5e-4, steps=1, batch_size=2, max_length=96, save_every=1),
            run_dir=unit / "calibration")
    assert (unit / "calibration" / "checkpoint.safetensors").is_file()
    summary = pipeline.run_pipeline(from_dict(RunConfig, settings))  # lr 1e-3: the calibration runs again
    assert summary["units"][0]["train"]["steps"] == 1 and json.loads((unit / "calibration.json").read_text())["reusable"]


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
