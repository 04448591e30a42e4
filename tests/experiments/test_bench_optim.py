"""`samsuite bench optim` in quick mode: the structure of its result, never its timings (timings
are not tests; the targets are recorded, not asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments.bench import optim
from shared import OPTIMIZERS


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    out_dir = tmp_path_factory.mktemp("bench")
    threads_before = torch.get_num_threads()
    result = optim.run(out_dir=out_dir, quick=True, seed=0, threads=1)
    assert torch.get_num_threads() == threads_before, "run() must restore the thread count"
    return result, out_dir


def test_writes_the_returned_result_atomically(quick_run) -> None:
    result, out_dir = quick_run
    assert sorted(p.name for p in out_dir.iterdir()) == ["optim.json", "optim.md"]  # no temp file left behind
    assert json.loads((out_dir / "optim.json").read_text()) == result
    table = (out_dir / "optim.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| cnn1d | saf |")]
    ratio = result["models"]["cnn1d"]["optimizers"]["saf"]["member_backward"]["ratio"]
    assert len(rows) == 1 and f"| {ratio:.3f} | sgd |" in rows[0] and "<= 1.05" in rows[0]


def test_records_config_and_environment(quick_run) -> None:
    result, _ = quick_run
    assert result["benchmark"] == "optim"
    config, env = result["config"], result["environment"]
    assert config["quick"] is True and config["seed"] == 0
    assert config["batch_size"] == 128 and config["rounds"] >= 1
    assert env["versions"]["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["torch_threads"] == 1


def test_both_models_with_every_candidate(quick_run) -> None:
    result, _ = quick_run
    assert set(result["models"]) == {"cnn", "cnn1d", "mlp"}
    assert result["models"]["mlp"]["parameter_tensors"] >= 100
    have_pto = optim._pytorch_optimizer_sam()[0] is not None
    for model in result["models"].values():
        rows = model["optimizers"]
        floors = {"two_passes", "one_pass+1_forward", "two_passes+1_forward"}  # the passes of every member
        expected = {"sgd", optim.LOOP, optim.TERM, optim.QUANT, *floors, *OPTIMIZERS.names()} | ({optim.PTO} if have_pto else set())
        assert set(rows) == expected
        assert set(rows["sgd"]) == {"base"} and all(set(rows[f]) == {"floor"} for f in floors)
        assert rows["sgd"]["base"]["ratio"] == pytest.approx(1.0)
        for name in OPTIMIZERS.names():
            drivers = {"member_backward"} if OPTIMIZERS.get(name).driver_only else set(optim.DRIVERS)
            assert set(rows[name]) == drivers


def test_two_pass_members_cost_more_than_one_base_step(quick_run) -> None:
    result, _ = quick_run
    for model in result["models"].values():
        two_pass = []
        for member, drivers in model["optimizers"].items():
            for driver, row in drivers.items():
                for key in ("ratio", "paired_ratio", "over_floor", "paired_ratio_q25", "paired_ratio_q75"):
                    assert math.isfinite(row[key]), (member, driver, key)
                assert row["ratio"] > 0 and row["paired_ratio_q25"] <= row["paired_ratio_q75"], (member, driver)
                assert row["params_finite"], (member, driver)
                assert row["samples"] == result["config"]["rounds"]
                if (member in OPTIMIZERS and not OPTIMIZERS.get(member).driver_only) or member in (optim.LOOP, optim.PTO,
                                                                                                  optim.floor_name((2, 0))):
                    two_pass.append(row["ratio"])
        # two forward/backward passes against one; averaged, as quick mode's 7 rounds on a busy
        # machine can put a single median below 1
        assert sum(two_pass) / len(two_pass) > 1.0, two_pass


def test_each_member_is_measured_over_the_floor_of_its_own_passes(quick_run) -> None:
    rows = quick_run[0]["models"]["cnn1d"]["optimizers"]
    floor = {name: rows[name]["floor"]["ratio"] for name in ("two_passes", "one_pass+1_forward", "two_passes+1_forward")}
    for member, name in (("sam", "two_passes"), ("mesa", "one_pass+1_forward"), ("tram-x", "two_passes+1_forward")):
        row = rows[member]["member_backward"]
        assert row["floor"] == name and row["over_floor"] == pytest.approx(row["ratio"] - floor[name])
    for row in (rows["saf"]["member_backward"], rows[optim.TERM]["base"], rows[optim.QUANT]["base"]):
        assert row["floor"] == "sgd" and row["over_floor"] == pytest.approx(row["ratio"] - 1.0)


def test_member_state_is_measured(quick_run) -> None:
    """SAF's buffer: 128 examples x (E~ + 1) x 10 classes x 4 bytes; MESA's EMA: one model copy."""
    result, _ = quick_run
    rows = result["models"]["cnn"]["optimizers"]
    saf = OPTIMIZERS.get("saf")(torch.nn.Linear(1, 1).parameters())
    assert rows["saf"]["member_backward"]["member_state_bytes"] >= 128 * (saf.past + 1) * 10 * 4
    params = result["models"]["cnn"]["parameters"]
    assert rows["mesa"]["member_backward"]["member_state_bytes"] >= 4 * params
    assert rows["sam"]["steps"]["member_state_bytes"] == 0


def test_targets_are_recorded_not_enforced(quick_run) -> None:
    result, _ = quick_run
    checks = result["targets"]
    kinds = {(c["model"], c["optimizer"], c["kind"]) for c in checks}
    for model, member in optim.RATIO_TARGETS:
        assert (model, member, "ratio_to_base") in kinds
    assert ("mlp", "sam", f"no_slower_than:{optim.LOOP}") in kinds
    for c in checks:
        assert c["met"] == (c["value"] <= c["bound"])
        if c["kind"] == "ratio_to_base":
            assert c["floor_ratio"] == pytest.approx(c["value"] - result["models"][c["model"]]["optimizers"][
                c["optimizer"]][c["driver"]]["over_floor"])
    assert result["all_targets_met"] == all(c["met"] for c in checks)
