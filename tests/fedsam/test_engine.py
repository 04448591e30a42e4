"""The in-process engine end to end on the embedded digits data: algorithm semantics against
float64 references, determinism, resume after a kill, failures, engine dispatch and sweeps."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from suite_fixtures import kill_after_first_checkpoint
from torch.func import functional_call

import fedsam.run as run_module
from fedsam.client import federated_data, initial_state, node_model
from fedsam.config import FedConfig
from fedsam.engine import load_sweep, run_fed, run_inprocess
from fedsam.topology import build_topology, metropolis_hastings
from shared.checkpoint import load_checkpoint
from shared.config import ConfigError

TIMING = ("compute_s", "round_s", "time_s")


def small(tmp_path: Path, name: str, **kw: object) -> FedConfig:
    base: dict[str, object] = {"name": name, "out_dir": str(tmp_path), "num_nodes": 5, "rounds": 3, "local_steps": 2,
                               "batch_size": 32}
    base.update(kw)
    return FedConfig(**base)  # type: ignore[arg-type]


def local_sgd_float64(cfg: FedConfig) -> np.ndarray:
    """Y (N, P): every node's one full-batch SGD step with weight decay from the common x0, in float64."""
    data = federated_data(cfg)
    model = node_model(cfg, data).double()
    x0 = {k: v.double() for k, v in initial_state(cfg, data).items()}
    rows = []
    for node in data.nodes:
        params = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
        loss = F.cross_entropy(functional_call(model, params, (node.train_x.double(),)), node.train_y)
        grads = torch.autograd.grad(loss, list(params.values()))
        rows.append(np.concatenate([(x0[k] - cfg.lr * (g + cfg.weight_decay * x0[k])).numpy().ravel()
                                    for k, g in zip(params, grads)]))
    model.float()
    return np.stack(rows)


@pytest.mark.parametrize(
    ("algorithm", "extra", "mixing"),
    [
        ("dfedavg", {}, lambda W, J: W),  # one gossip step: X = W (x0 - lr g)
        ("dfedsam-mgs", {"optimizer": "sgd", "gossip_steps": 3}, lambda W, J: W @ W @ W),  # MGS: W^Q
        ("fedavg", {}, lambda W, J: J),  # the server average
    ],
)
def test_one_round_equals_the_mixing_of_local_sgd(tmp_path: Path, algorithm: str, extra: dict, mixing: object) -> None:
    cfg = small(tmp_path, algorithm, algorithm=algorithm, rounds=1, local_steps=1, batch_size=4096, **extra)
    run_inprocess(cfg, progress=False)
    X = load_checkpoint(tmp_path / algorithm / "checkpoint.safetensors")["X"].double().numpy()  # type: ignore[index]
    W = metropolis_hastings(build_topology("ring", 5))
    want = mixing(W, np.full((5, 5), 1 / 5)) @ local_sgd_float64(cfg)  # type: ignore[operator]
    np.testing.assert_allclose(X, want, rtol=0, atol=2e-6)


def test_runs_repeat_exactly_and_resume_after_a_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run_inprocess(small(tmp_path, "ref"), progress=False)
    kill_after_first_checkpoint(monkeypatch, lambda: run_inprocess(small(tmp_path, "killed"), progress=False))
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = run_inprocess(small(tmp_path, "killed"), progress=False)

    def strip(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    want = strip(run_module.RunDir(tmp_path / "ref").metrics())
    assert strip(run_module.RunDir(tmp_path / "killed").metrics()) == want and len(want) == 3
    assert resumed["results"]["test_acc"] == reference["results"]["test_acc"]
    assert want[0]["train_loss"] > want[-1]["train_loss"]  # it trains
    other_seed = run_inprocess(small(tmp_path, "seed1", seed=1), progress=False)
    assert other_seed["final"]["consensus_distance"] != reference["final"]["consensus_distance"]


def test_failed_nodes_are_logged_and_the_run_continues(tmp_path: Path) -> None:
    cfg = small(tmp_path, "flaky", fail_prob=0.3, rounds=4, seed=2)
    summary = run_inprocess(cfg, progress=False)
    records = run_module.RunDir(tmp_path / "flaky").metrics()
    probe = run_module.FedRun(small(tmp_path, "probe", fail_prob=0.3, rounds=4, seed=2), progress=False)
    expected = [probe.simulated_failures(r) for r in range(4)]
    assert [r["failed"] for r in records] == expected and any(expected)
    assert [r["live"] for r in records] == [5 - len(f) for f in expected]
    assert len(records) == 4 and summary["final"]["test_acc"] is not None


def test_engine_flower_dispatches_to_the_flower_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsam.server_app

    calls = []
    monkeypatch.setattr(fedsam.server_app, "run_flower", lambda cfg, progress: calls.append((cfg.engine, progress)) or {})
    assert run_fed(small(tmp_path, "fl", engine="flower"), progress=False) == {}
    assert calls == [("flower", False)]


def test_sweep_files_expand_to_validated_named_configs(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "sweep:\n  name: s\n  grid:\n    algorithm: [dfedsam, dpsgd]\n"
        "    data: [{partitioner: dirichlet, alpha: 0.6}, {partitioner: iid}]\n    gossip_steps: [2]\n"
        f"num_nodes: 4\nrounds: 2\nout_dir: {tmp_path}\n"
    )
    sweep = load_sweep(path, ["rounds=5"])
    assert [c.name for c in sweep.configs] == [
        "dfedsam-dirichlet-0.6-gossip_steps-2", "dfedsam-iid-gossip_steps-2",
        "dpsgd-dirichlet-0.6-gossip_steps-2", "dpsgd-iid-gossip_steps-2",
    ]
    assert {(c.algorithm, c.partitioner, c.alpha, c.q, c.rounds) for c in sweep.configs} == {
        ("dfedsam", "dirichlet", 0.6, 2, 5), ("dfedsam", "iid", 0.3, 2, 5),
        ("dpsgd", "dirichlet", 0.6, 2, 5), ("dpsgd", "iid", 0.3, 2, 5),
    }
    assert sweep.out == tmp_path / "s" and all(c.out_dir == str(tmp_path / "s") for c in sweep.configs)
    path.write_text("sweep:\n  grid:\n    topology: [ring, rign]\n")
    with pytest.raises(ConfigError, match="topology: unknown topology 'rign'"):
        load_sweep(path)
    path.write_text("rounds: 3\n")
    with pytest.raises(ConfigError, match="sweep: .* needs a 'sweep:' section"):
        load_sweep(path)
    path.write_text("sweep:\n  grid:\n    topology: ring\n")
    with pytest.raises(ConfigError, match="sweep.grid.topology: expected a non-empty list"):
        load_sweep(path)
