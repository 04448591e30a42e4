import json
from pathlib import Path

import pytest

import experiments.train as train_module
from experiments.train import TrainConfig, run_train
from shared.config import ConfigError


def small(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    base = {"name": name, "out_dir": str(tmp_path), "epochs": 2, "width": 8, "batch_size": 128,
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
    assert saved["config"]["seed"] == 0 and "torch" in saved["environment"]["versions"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 * 3


def test_killed_run_resumes_to_the_same_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run_train(small(tmp_path, "ref"))
    calls = {"n": 0}
    real_save = train_module._save

    def save_then_die(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(small(tmp_path, "killed"))
    monkeypatch.setattr(train_module, "_save", real_save)
    resumed = run_train(small(tmp_path, "killed"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("step_time")} for r in rows]
    assert strip(resumed["results"]) == strip(reference["results"])
    with pytest.raises(ConfigError, match="different config"):
        run_train(small(tmp_path, "killed", lr=0.2))


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
    result = cli("train", f"out_dir={tmp_path}", "name=cli", "epochs=1", "width=4", "optimizers=[sgd, gsam]")
    assert result.exit_code == 0, result.output
    assert "| gsam |" in result.output
