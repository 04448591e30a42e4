import csv
import json
from pathlib import Path

import pytest


@pytest.fixture
def invoke(cli):
    def run(*args: str) -> tuple[int, str]:
        result = cli("fed", *args)
        return result.exit_code, result.output

    return run


def test_fed_run_default_config_on_fewer_rounds(tmp_path: Path, invoke) -> None:
    code, output = invoke("run", f"out_dir={tmp_path}", "rounds=6", "--no-progress")
    assert code == 0, output
    assert "| digits-dfedsam-ring-dirichlet-n10-s0 | dfedsam | ring | 1 | digits dirichlet(0.3) | 10 | 6 |" in output
    run = tmp_path / "digits-dfedsam-ring-dirichlet-n10-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["num_nodes"] == 10 and summary["resolved"]["optimizer"] == "sam"
    assert 0 < summary["spectral_gap"] < 0.2  # a 10-node ring mixes slowly
    assert summary["results"]["best_test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6 and (run / "curves.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["algorithm=dfedsamm"], "algorithm: unknown algorithm 'dfedsamm'; did you mean 'dfedsam'?"),
        (["topology=rign"], "topology: unknown topology 'rign'"),
        (["partitioner=dirichlett"], "partitioner: unknown partitioner 'dirichlett'"),
        (["gossip_steps=0"], "gossip_steps: expected an integer >= 1, got 0"),
        (["rho=0"], "rho: expected a value > 0"),
        (["rho=-1"], "rho: expected a value > 0"),
        (["num_nodes=5000", "topology=full"], "num_nodes: digits has"),
        (["lr=fast"], "lr: expected a number"),
    ],
)
def test_fed_run_rejects_bad_input_before_training(tmp_path: Path, args: list[str], message: str, invoke) -> None:
    code, output = invoke("run", f"out_dir={tmp_path}", *args)
    assert code == 2 and message in output, output
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


def test_fed_compare_and_sweep(tmp_path: Path, invoke) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep:\n  name: tiny\n  title: Tiny sweep\n  grid:\n    algorithm: [dfedsam, dpsgd]\n"
        f"num_nodes: 4\nrounds: 2\nlocal_steps: 2\nout_dir: {tmp_path}\n"
    )
    code, output = invoke("sweep", str(sweep), "topology=full", "--no-progress")
    assert code == 0, output
    assert "**Tiny sweep**" in output and "| dfedsam | dfedsam | full |" in output and "| dpsgd | dpsgd | full |" in output
    rows = list(csv.DictReader((tmp_path / "tiny" / "compare.csv").open()))
    assert [r["run"] for r in rows] == ["dfedsam", "dpsgd"] and (tmp_path / "tiny" / "compare.png").is_file()
    final = json.loads((tmp_path / "tiny" / "dpsgd" / "summary.json").read_text())["final"]
    assert float(rows[1]["test_acc"]) == round(final["test_acc"], 4)
    assert float(rows[1]["MB_sent"]) == round(final["bytes_sent"] / 1e6, 2)

    out = tmp_path / "cmp"
    code, output = invoke("compare", str(tmp_path / "tiny" / "dpsgd"), str(tmp_path / "tiny" / "dfedsam"), "--out", str(out))
    assert code == 0, output
    assert [r["run"] for r in csv.DictReader((out / "compare.csv").open())] == ["dpsgd", "dfedsam"]
    code, output = invoke("compare", str(tmp_path / "nope"))
    assert code == 2 and "not a fedsam run folder" in output


def test_a_sweep_over_seeds_tabulates_paired_differences(tmp_path: Path, invoke) -> None:
    sweep = tmp_path / "seeds.yaml"
    sweep.write_text(
        "sweep:\n  name: s\n  reference: {algorithm: dfedavg}\n  grid:\n    algorithm: [dfedsam, dfedavg]\n"
        "    data: [{partitioner: dirichlet, alpha: 0.5}]\n    seed: [0, 1, 2]\n"
        f"num_nodes: 4\nrounds: 2\nlocal_steps: 2\nout_dir: {tmp_path}\n"
    )
    code, output = invoke("sweep", str(sweep), "--no-progress")
    assert code == 0, output
    per_run = {r["run"]: r for r in csv.DictReader((tmp_path / "s" / "compare.csv").open())}
    rows = list(csv.DictReader((tmp_path / "s" / "compare_seeds.csv").open()))
    assert [(r["algorithm"], r["data"], r["seeds"]) for r in rows] == [
        ("dfedsam", "dirichlet(alpha=0.5)", "3"), ("dfedavg", "dirichlet(alpha=0.5)", "3")]
    acc = {a: [float(per_run[f"{a}-dirichlet-0.5-seed-{s}"]["test_acc"]) for s in range(3)] for a in ("dfedsam", "dfedavg")}
    diff = [x - y for x, y in zip(acc["dfedsam"], acc["dfedavg"])]
    assert float(rows[0]["diff_vs_dfedavg"]) == pytest.approx(sum(diff) / 3, abs=1e-4)
    assert float(rows[0]["ci95_low"]) <= float(rows[0]["diff_vs_dfedavg"]) <= float(rows[0]["ci95_high"])
    assert rows[1]["diff_vs_dfedavg"] == "" and float(rows[1]["test_acc"]) == pytest.approx(sum(acc["dfedavg"]) / 3, abs=1e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  reference: {algorithm: fedavg}\n  grid:\n    algorithm: [dfedsam]\n    seed: [0, 1]\n")
    code, output = invoke("sweep", str(bad))
    assert code == 2 and "sweep.reference.algorithm: 'fedavg' is not one of its values: dfedsam" in output
