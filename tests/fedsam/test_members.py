"""Every SAM-family member as the fedsam local optimizer, with its own state (SAF's buffer, MESA's
EMA model, TRAM's target) kept per node from round to round: the config, `local_update`'s
member_state, the in-process engine, checkpoints and resume, and the message flattening."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from suite_fixtures import kill_after_first_checkpoint

import fedsam.run as run_module
from fedsam.client import federated_data, flatten_member_state, initial_state, local_update, unflatten_member_state
from fedsam.config import FedConfig
from fedsam.engine import run_inprocess
from shared import OPTIMIZERS
from shared.checkpoint import load_checkpoint
from shared.config import ConfigError

DRIVER_ONLY = [n for n in OPTIMIZERS.names() if OPTIMIZERS.get(n).driver_only]  # a new member is picked up here
TIMING = ("compute_s", "round_s", "time_s")
# SAF whose trajectory term starts at an example's second visit: round 2 of one-epoch rounds
# already uses round 1's logits, so the metrics depend on the buffer having persisted.
SAF_NOW = {"optimizer": "saf", "optimizer_options": {"past": 1, "start_epoch": 1}}


def small(tmp_path: Path, name: str, **kw: Any) -> FedConfig:
    """A tiny digits run: 4 iid nodes on a ring, one local epoch per round in batches of 32."""
    base: dict[str, Any] = {"name": name, "out_dir": str(tmp_path), "num_nodes": 4, "partitioner": "iid",
                            "algorithm": "dfedavg", "rounds": 2, "local_epochs": 1, "batch_size": 32}
    base.update(kw)
    return FedConfig(**base)


def metrics(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run_module.RunDir(tmp_path / name).metrics()]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_member_builds_as_the_local_optimizer(name: str) -> None:
    """rho goes to the members whose constructor takes it, and only to them (SAF, MESA and TRAM
    refuse it), so every member builds from the same config."""
    cls = OPTIMIZERS.get(name)
    opt = FedConfig(optimizer=name, rho=0.2).local_optimizer([torch.zeros(2, requires_grad=True)], 0)
    assert type(opt) is cls
    if "rho" in inspect.signature(cls).parameters:
        assert opt.param_groups[0]["rho"] == 0.2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"optimizer": "saf", "optimizer_options": {"past": 0}}, r"optimizer 'saf' .*past"),
    ({"optimizer": "mesa", "optimizer_options": {"beta": 1.5}}, r"optimizer 'mesa' .*beta"),
    ({"optimizer": "tram-prev", "optimizer_options": {"rho": 0.1}}, r"optimizer 'tram-prev' .*rho: TRAM has no rho"),
])
def test_bad_member_options_fail_at_config_time(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedConfig(**overrides)


# ------------------------------------------------------------------------------------------------ local_update
def test_local_update_continues_the_member_state(tmp_path: Path) -> None:
    """With member_state, local_update returns the new state third and continues from the one it
    is given (which it leaves as it was); without, it returns (y_i, metrics) as before."""
    cfg = small(tmp_path, "lu", **SAF_NOW)
    data = federated_data(cfg)
    x0 = initial_state(cfg, data)
    y0, _, state = local_update(x0, 1, 0, cfg, data, member_state={})
    assert set(state) == {"bank", "visits"} and bool((state["visits"] == 1).all())
    before = {k: v.clone() for k, v in state.items()}
    continued = local_update(y0, 1, 1, cfg, data, member_state=state)
    again = local_update(y0, 1, 1, cfg, data, member_state=state)
    fresh = local_update(y0, 1, 1, cfg, data)
    assert len(fresh) == 2 and all(torch.equal(state[k], before[k]) for k in state)  # not mutated
    assert all(torch.equal(continued[0][k], again[0][k]) for k in continued[0])
    assert continued[1]["train_loss"] == again[1]["train_loss"]
    assert not torch.equal(continued[0]["head.weight"], fresh[0]["head.weight"])  # the term applied
    assert bool((continued[2]["visits"] == 2).all())


# ------------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("name", DRIVER_ONLY)
def test_every_driver_only_member_trains_in_the_inprocess_engine(tmp_path: Path, name: str) -> None:
    summary = run_inprocess(small(tmp_path, name, optimizer=name, rounds=3, local_epochs=None, local_steps=3),
                            progress=False)
    records = metrics(tmp_path, name)
    assert [r["round"] for r in records] == [1, 2, 3] and summary["final"]["round"] == 3
    for record in records:
        for key in ("train_loss", "test_loss", "test_acc", "personal_acc_mean", "consensus_distance"):
            assert math.isfinite(record[key]), (record["round"], key)


def test_saf_buffer_persists_per_node(tmp_path: Path) -> None:
    """After 2 one-epoch rounds every node's own buffer holds one row per training example, each
    visited twice; the checkpoint holds the states (none for SGD, whose checkpoint is as before)."""
    cfg = small(tmp_path, "saf", **SAF_NOW)
    run_inprocess(cfg, progress=False)
    saved = load_checkpoint(tmp_path / "saf" / "checkpoint.safetensors")
    assert saved is not None
    states = saved["member_state"]
    data = federated_data(cfg)
    assert sorted(states) == [str(i) for i in range(cfg.num_nodes)]
    for i, node in enumerate(data.nodes):
        n = len(node.train_y)
        bank, visits = states[str(i)]["bank"], states[str(i)]["visits"]
        assert tuple(bank.shape) == (n, 2, data.num_classes)  # past + 1 slots of logits
        assert visits.tolist() == [2] * n
    run_inprocess(small(tmp_path, "sgd", optimizer="sgd"), progress=False)
    assert "member_state" not in load_checkpoint(tmp_path / "sgd" / "checkpoint.safetensors")  # type: ignore[operator]


def test_saf_resume_repeats_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after round 1's checkpoint and resumed: the same metrics as without the kill (the
    buffers come back from the checkpoint; without them round 2 would train differently)."""
    run_inprocess(small(tmp_path, "ref", rounds=3, **SAF_NOW), progress=False)
    kill_after_first_checkpoint(monkeypatch, lambda: run_inprocess(small(tmp_path, "killed", rounds=3, **SAF_NOW),
                                                                   progress=False))
    assert len(metrics(tmp_path, "killed")) == 1
    run_inprocess(small(tmp_path, "killed", rounds=3, **SAF_NOW), progress=False)
    want = metrics(tmp_path, "ref")
    assert metrics(tmp_path, "killed") == want and len(want) == 3


def test_member_state_is_not_communication(tmp_path: Path) -> None:
    """SAF's buffers stay with their nodes: the bytes sent are SGD's, round by round, though the
    trajectory term changed the training."""
    saf = run_inprocess(small(tmp_path, "saf", **SAF_NOW), progress=False)
    sgd = run_inprocess(small(tmp_path, "sgd", optimizer="sgd"), progress=False)
    assert saf["results"]["MB_sent"] == sgd["results"]["MB_sent"] > 0
    assert [r["bytes_sent"] for r in metrics(tmp_path, "saf")] == [r["bytes_sent"] for r in metrics(tmp_path, "sgd")]
    assert metrics(tmp_path, "saf")[0]["train_loss"] == metrics(tmp_path, "sgd")[0]["train_loss"]  # no term yet
    assert metrics(tmp_path, "saf")[1]["train_loss"] != metrics(tmp_path, "sgd")[1]["train_loss"]


# ------------------------------------------------------------------------------------------------ flattening
def test_member_state_flattening_round_trips() -> None:
    ema = {"conv.weight": torch.randn(2, 3), "bn.num_batches_tracked": torch.tensor(4)}
    state = {"steps": 7, "ema": ema, "bank": torch.randn(5, 2, 3, dtype=torch.float16), "on": True, "scale": 0.5}
    flat = flatten_member_state(state)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    assert set(flat) == {"steps", "ema.conv.weight", "ema.bn.num_batches_tracked", "bank", "on", "scale"}
    back = unflatten_member_state(flat)
    assert back.keys() == state.keys() and (back["steps"], back["on"], back["scale"]) == (7, True, 0.5)
    assert type(back["steps"]) is int and back["bank"].dtype == torch.float16 and torch.equal(back["bank"], state["bank"])
    assert back["ema"].keys() == ema.keys() and all(torch.equal(back["ema"][k], ema[k]) for k in ema)
    assert flatten_member_state({}) == {} and unflatten_member_state({}) == {}


@pytest.mark.parametrize(("state", "error"), [
    ({"a.b": torch.zeros(1)}, ValueError),
    ({"ema": {"layer": {"weight": torch.zeros(1)}}}, TypeError),
    ({"name": "text"}, TypeError),
])
def test_member_state_flattening_refuses_what_it_cannot_restore(state: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match="member state"):
        flatten_member_state(state)
