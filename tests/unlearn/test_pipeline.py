"""`samsuite unlearn run` end to end on a very small embedded benchmark and a tiny model: every
result file, values that agree with evaluating the saved models again, resume that skips finished
stages (and reruns only what a changed setting touches), `compare`, and the config's bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from suite_fixtures import unlearn_settings
from typer.testing import CliRunner

from experiments.cli import app
from shared.config import ConfigError, apply_overrides, from_dict, to_dict
from shared.runio import RunDir
from unlearn import pipeline
from unlearn.benchmarks import load_benchmark
from unlearn.eval import evaluate
from unlearn.models import load_model
from unlearn.pipeline import RunConfig, compare_runs, load_run_config, run_pipeline
from unlearn.relearn import relearn
from unlearn.train import unlearn as train_unlearn


@pytest.fixture(scope="module")
def bench_dir(unlearn_bench) -> Path:
    return unlearn_bench


settings = unlearn_settings


@pytest.fixture(scope="module")
def finished(bench_dir, tmp_path_factory) -> tuple[RunConfig, dict]:
    cfg = from_dict(RunConfig, settings(bench_dir, tmp_path_factory.mktemp("runs")))
    return cfg, run_pipeline(cfg)


def test_writes_every_result_file(finished):
    cfg, summary = finished
    run = Path(cfg.out_dir) / cfg.name
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "results.csv", "results.md", "bars.png",
                 "relearn_curves.png", "target.json", "retrain.json"):
        assert (run / name).is_file(), name
    for label in ("npo", "npo+sam"):
        unit = run / label / "seed0"
        for name in ("unlearned.json", "relearned.json", "model/config.json", "train/metrics.jsonl",
                     "relearn/relearn.json", "relearn/draw0/metrics.jsonl", "relearn/draw1/metrics.jsonl"):
            assert (unit / name).is_file(), (label, name)
        assert not list((unit / "train").glob("checkpoint.*"))  # model/ is the product
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["environment"]["versions"]["torch"] == torch.__version__ and summary["seeds"] == [0]
    assert [r["model"] for r in summary["table"]] == ["target", "retrain", "npo", "npo+sam"]
    assert summary["metrics"] == ["forget_acc", "utility_acc", "forget_acc_cloze", "utility_acc_cloze", "verbmem_f",
                                  "knowmem_f", "knowmem_r", "privleak_auc",
                                  "privleak"]
    assert summary["curve_metrics"] == ["forget_acc", "forget_acc_cloze", "verbmem_f", "knowmem_f"]
    md = (run / "results.md").read_text()
    assert "| model | seeds | forget_acc |" in md and "forget_acc after relearning" in md


def test_the_relearning_summaries_pair_each_smoother_with_its_plain_method(finished):
    """AUC, recovery and final value per method, and npo+sam - npo paired over the seed's 2 draws and over
    the seed (its draws averaged), recomputed here from the recorded curves."""
    from unlearn.summaries import curve_auc

    cfg, summary = finished
    run = Path(cfg.out_dir) / cfg.name
    assert summary["resilience"]["pairs"] == {"npo+sam": "npo"}
    resilience = summary["resilience"]["attacks"]["relearn"]
    metric = summary["curve_metrics"][0]
    units = {u["method"]: u for u in summary["units"]}
    aucs = {m: [curve_auc(d["curve"], metric) for d in units[m]["draws"]] for m in ("npo", "npo+sam")}
    row = next(r for r in resilience["paired_draws"] if r["summary"] == "auc" and r["metric"] == metric)
    assert row["n"] == cfg.relearn.draws == 2
    assert row["mean"] == pytest.approx(sum(a - b for a, b in zip(aucs["npo+sam"], aucs["npo"])) / 2)
    seed = next(r for r in resilience["paired"] if r["summary"] == "auc" and r["metric"] == metric)
    assert (seed["n"], seed["mean"]) == (1, pytest.approx(row["mean"]))  # one seed: its draws averaged
    assert resilience["methods"]["npo"]["auc"][metric]["mean"] == pytest.approx(sum(aucs["npo"]) / 2)
    for name in ("resilience", "paired"):
        assert (run / f"{name}.csv").is_file() and (run / f"{name}.md").is_file()
    assert (run / "paired.png").stat().st_size > 10_000  # the forest plot of the differences
    assert "npo+sam - npo" in (run / "paired.md").read_text()


def test_recorded_values_are_those_of_the_saved_models(finished):
    cfg, summary = finished
    run = Path(cfg.out_dir) / cfg.name
    bench = load_benchmark(cfg.benchmark)
    retrain_auc = summary["retrain_privleak_auc"]
    assert retrain_auc == summary["references"]["retrain"]["metrics"]["privleak_auc"]
    for name, spec in (("target", bench.models["target"]), ("npo+sam", str(run / "npo+sam" / "seed0" / "model"))):
        model, tok = load_model(spec)
        again = evaluate(model, tok, bench, metrics=summary["metrics"], max_samples=4, batch_size=8,
                         retrain_auc=retrain_auc)
        recorded = (summary["references"]["target"]["metrics"] if name == "target"
                    else summary["units"][1]["unlearned"])
        assert again == pytest.approx(recorded, abs=1e-9), name
    unit = summary["units"][0]
    assert unit["method"] == "npo" and unit["relearned"] == {k: v for k, v in unit["curve"][-1].items() if k != "step"}
    assert [r["step"] for r in unit["curve"]] == [0, 1, 2]
    # step 0 of every draw is the unlearned model itself: its forget metrics as after unlearning
    for draw in unit["draws"]:
        assert draw["curve"][0]["forget_acc"] == unit["unlearned"]["forget_acc"]
    npo = summary["methods"]["npo"]
    assert npo["unlearned"]["forget_acc"] == {"mean": unit["unlearned"]["forget_acc"], "std": None}  # one seed: no std
    stages = [r["stage"] for r in RunDir(run).metrics()]
    assert stages == ["retrain", "target", "unlearned", "relearn", "relearn", "relearn",
                      "unlearned", "relearn", "relearn", "relearn"]


def test_rerun_skips_finished_stages_and_redoes_only_what_changed(finished, monkeypatch):
    cfg, summary = finished
    run = Path(cfg.out_dir) / cfg.name
    metrics_before = (run / "metrics.jsonl").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "unlearn", must_not_run)
    monkeypatch.setattr(pipeline, "relearn", must_not_run)
    again = run_pipeline(cfg)
    assert (run / "metrics.jsonl").read_text() == metrics_before  # rebuilt, no duplicates
    assert again["table"] == summary["table"]

    monkeypatch.setattr(pipeline, "relearn", relearn)
    changed = from_dict(RunConfig, {**settings(Path(cfg.benchmark), Path(cfg.out_dir)),
                                    "relearn": {**to_dict(cfg.relearn), "lr": 5e-4, "draws": 1}})
    redone = run_pipeline(changed)  # unlearning is kept (unlearn still refuses to run), the attack reruns
    assert redone["units"][0]["unlearned"] == summary["units"][0]["unlearned"]
    assert [len(u["draws"]) for u in redone["units"]] == [1, 1]
    draw = json.loads((run / "npo" / "seed0" / "relearn" / "draw0" / "draw.json").read_text())
    assert draw["config"]["lr"] == 5e-4


def test_an_interrupted_unlearning_resumes_from_its_checkpoint(bench_dir, tmp_path, monkeypatch):
    data = settings(bench_dir, tmp_path, methods=[{"objective": "npo"}])
    data["relearn"] = {**data["relearn"], "draws": 1, "steps": 1}
    cfg = from_dict(RunConfig, data)

    def killed(*args, **kwargs):  # the training finished, the process died before the stage's result file
        train_unlearn(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "unlearn", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    unit = tmp_path / "small" / "npo" / "seed0"
    assert (unit / "train" / "checkpoint.safetensors").is_file() and not (unit / "unlearned.json").exists()
    monkeypatch.setattr(pipeline, "unlearn", train_unlearn)
    run_pipeline(cfg)
    assert json.loads((unit / "train" / "summary.json").read_text())["resumed_from"] == cfg.unlearn.steps
    assert (unit / "unlearned.json").is_file() and not (unit / "train" / "checkpoint.safetensors").exists()


def test_keep_models_false_removes_them(bench_dir, tmp_path):
    data = settings(bench_dir, tmp_path, methods=[{"objective": "ga", "label": "ga-test"}], keep_models=False)
    data["relearn"] = {**data["relearn"], "draws": 1, "steps": 1}
    summary = run_pipeline(from_dict(RunConfig, data))
    assert not (tmp_path / "small" / "ga-test" / "seed0" / "model").exists()
    assert [r["model"] for r in summary["table"]] == ["target", "retrain", "ga-test"]


def test_cli_run_resumes_and_compare_tabulates(finished, tmp_path):
    cfg, _ = finished
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(settings(Path(cfg.benchmark), Path(cfg.out_dir))))
    result = CliRunner().invoke(app, ["unlearn", "run", str(config)])
    assert result.exit_code == 0, result.output
    assert "| npo+sam | 1 |" in result.output

    run = Path(cfg.out_dir) / cfg.name
    result = CliRunner().invoke(app, ["unlearn", "compare", str(run), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    rows = compare_runs([run], tmp_path / "cmp2")
    assert [r["model"] for r in rows] == ["target", "retrain", "npo", "npo+sam"] and rows[0]["run"] == "small"
    assert (tmp_path / "cmp" / "compare.md").read_text() == (tmp_path / "cmp2" / "compare.md").read_text()
    with pytest.raises(ConfigError, match="no summary.json"):
        compare_runs([tmp_path], tmp_path / "cmp3")

    result = CliRunner().invoke(app, ["unlearn", "relearn", "--model", str(run / "npo" / "seed0" / "model"),
                                      "--benchmark", cfg.benchmark, "--out", str(tmp_path / "attack"),
                                      "--max-samples", "4", "n_samples=2", "draws=1", "steps=1", "lr=0.001",
                                      "max_length=96"])
    assert result.exit_code == 0, result.output
    attack = json.loads((tmp_path / "attack" / "relearn.json").read_text())
    assert [r["step"] for r in attack["curve"]] == [0, 1] and (tmp_path / "attack" / "relearn_curves.png").is_file()


def test_overrides_change_single_fields_of_the_demo():
    cfg = load_run_config(None, ["unlearn.lr=0.0001", "seeds=[0, 1, 2]", "relearn.draws=1"])
    demo = RunConfig()
    assert cfg.unlearn.lr == 1e-4 and cfg.unlearn.steps == demo.unlearn.steps and cfg.unlearn.gamma == demo.unlearn.gamma
    assert cfg.seeds == [0, 1, 2] and cfg.relearn.draws == 1 and cfg.relearn.lr == demo.relearn.lr
    assert [cfg.method_label(i) for i in range(len(cfg.methods))] == ["npo", "npo+sam"]
    sam = cfg.method_config(1, seed=2)
    assert (sam.objective, sam.smoother, sam.seed, sam.lr) == ("npo", "sam", 2, 1e-4)
    assert cfg.unit_relearn(0).seed != cfg.unit_relearn(1).seed  # each seed its own relearning draws


def test_further_attacks_lora_and_unrelated_data(bench_dir, tmp_path):
    """`attacks`: a LoRA attack and one on retain texts (unrelated to the forget set), each with its own
    files, curves, table columns and paired summaries; the `relearn` attack keeps its files."""
    attacks = {"lora": {"lr": 1e-2, "options": {"lora": True, "lora_r": 4, "lora_alpha": 16.0,
                                                 "lora_targets": ["q_proj", "v_proj", "down_proj"]}},
               "unrelated": {"data": "retain", "n_samples": 3}}
    cfg = from_dict(RunConfig, settings(bench_dir, tmp_path, attacks=attacks, methods=[
        {"objective": "npo"}, {"objective": "npo", "smoother": "sam"}]))
    summary = run_pipeline(cfg)
    folder = tmp_path / cfg.name / "npo" / "seed0"
    for attack in ("relearn", "lora", "unrelated"):
        suffix = "" if attack == "relearn" else f"-{attack}"
        record = json.loads((folder / f"relearned{suffix}.json").read_text())
        assert record["attack"] == attack and len(record["draws"]) == cfg.relearn.draws
        assert (folder / f"relearn{suffix}" / "relearn.json").is_file()
        assert (tmp_path / cfg.name / ("relearn_curves.png" if attack == "relearn" else
                                       f"relearn_curves-{attack}.png")).is_file()
        assert summary["resilience"]["attacks"][attack]["paired"]
    retain = set(load_benchmark(str(bench_dir)).corpora["retain"]["text"])
    unrelated = json.loads((folder / "relearned-unrelated.json").read_text())
    assert all(len(d["samples"]) == 3 for d in unrelated["draws"])
    pool = json.loads((folder / "relearn-unrelated" / "relearn.json").read_text())["pool_size"]
    assert pool == len(retain)
    metric = summary["curve_metrics"][0]
    assert f"{metric} after lora" in summary["table"][0] and f"{metric} after unrelated" in summary["table"][0]
    # every attack starts from the same unlearned model: the curves' first points agree
    unit = next(u for u in summary["units"] if u["method"] == "npo")
    starts = {a: [d["curve"][0] for d in unit["attacks"][a]["draws"]] for a in unit["attacks"]}
    assert starts["lora"] == starts["unrelated"] == starts["relearn"]


@pytest.mark.parametrize("override, message", [
    ("attacks={relearn: {lr: 0.1}}", "attacks.relearn: not an attack name"),
    ("attacks={big: {data: holdout, n_samples: 999}}", r"attacks.big.n_samples: 999 is more than the \d+ texts of the holdout set"),
    ("attacks={odd: {data: elsewhere}}", "attacks.odd.data: unknown value 'elsewhere'"),
    ("attacks={lr: 0.1}", "attacks.lr: expected a mapping, got 0.1"),
])
def test_bad_attacks_are_refused_before_any_work(bench_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = from_dict(RunConfig, apply_overrides(settings(bench_dir, tmp_path), [override]))
        pipeline.check_run(cfg, pipeline._benchmark(cfg))
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("override, message", [
    ("methods=[{objective: npo}, {objective: npo}]", r"methods\[1\]: a second method labelled 'npo'"),
    ("methods=[{objective: npo}, {objective: npo, smoother: sam, bogus: 1}]", r"methods\[1\].bogus: unknown key"),
    ("methods=[{objective: npx}]", r"methods\[0\].objective: unknown objective 'npx'; did you mean 'npo'"),
    ("methods=[{objective: npo, seed: 3}]", r"methods\[0\].seed: set by the run"),
    ("methods=[]", "methods: expected at least one method"),
    ("seeds=[]", "seeds: expected at least one seed"),
    ("seeds=[1, 1]", "seeds: listed twice"),
    ("dtype=float8", "dtype: unknown value 'float8'"),
    ("unlearn.rho=0", "rho: expected a value > 0"),
    ("relearn.n_samples=0", "n_samples: expected an integer >= 1"),
    ("eval.batch_size=0", "eval.batch_size: expected an integer >= 1"),
    ("bogus=1", "bogus: unknown key"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_run_config(None, [override])
