"""FedRun, the relay, driven with hand-made updates (no training): mixing, failures, metrics,
checkpoints, and the checks that reject a bad config before any training."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsam.client import node_model
from fedsam.config import FedConfig
from fedsam.data import FederatedData, NodeData
from fedsam.mixing import unflatten
from fedsam.run import FedRun
from fedsam.topology import build_topology, topology_for_round
from shared.config import ConfigError
from shared.digits import digits_tensors

N = 5


@pytest.fixture(scope="module")
def data() -> FederatedData:
    """Digits cut into 5 nodes with 30 training and 4 + i local test examples each."""
    x, y = digits_tensors()
    nodes = [NodeData(x[40 * i : 40 * i + 30], y[40 * i : 40 * i + 30], x[40 * i + 30 : 40 * i + 34 + i],
                      y[40 * i + 30 : 40 * i + 34 + i]) for i in range(N)]
    return FederatedData("digits", nodes, x[1000:1300], y[1000:1300], 10, (1, 8, 8), None)


def make_run(tmp_path: Path, data: FederatedData, **kw: object) -> FedRun:
    base: dict[str, object] = {"num_nodes": N, "out_dir": str(tmp_path), "name": "run", "rounds": 3}
    base.update(kw)
    return FedRun(FedConfig(**base), progress=False, data=data)  # type: ignore[arg-type]


def fake_updates(run: FedRun, r: int, nodes: list[int] | None = None) -> dict[int, tuple[dict, dict]]:
    """y_i = x_i + noise, with made-up metrics (train loss i, i + 10 examples)."""
    gen = torch.Generator().manual_seed(100 + r)
    updates = {}
    for i, state in run.round_tasks(r):
        if nodes is None or i in nodes:
            y = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            updates[i] = (y, {"train_loss": float(i), "num_examples": i + 10, "compute_s": 0.5})
    return updates


def stacked(updates: dict[int, tuple[dict, dict]], run: FedRun) -> np.ndarray:
    """The (N, P) float64 matrix of the updates, the current rows for nodes without one."""
    rows = run.X.double().numpy().copy()
    for i, (state, _) in updates.items():
        rows[i] = np.concatenate([t.double().numpy().ravel() for t in state.values()])
    return rows


def mh_by_hand(adj: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights over the live subgraph, entry by entry."""
    n = len(adj)
    sub = adj & alive[:, None] & alive[None, :]
    deg = sub.sum(axis=1)
    W = np.eye(n)  # failed nodes: row e_i
    for i in np.flatnonzero(alive):
        for j in np.flatnonzero(sub[i]):
            W[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
        W[i, i] = 1.0 - sum(W[i, j] for j in np.flatnonzero(sub[i]))
    return W


def test_gossip_round_mixes_with_W_to_the_Q(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, algorithm="dfedsam-mgs", gossip_steps=3, topology="ring")
    updates = fake_updates(run, 0)
    Y = stacked(updates, run)
    record = run.finish_round(0, updates)
    W = mh_by_hand(build_topology("ring", N), np.ones(N, dtype=bool))
    np.testing.assert_allclose(W[0, [4, 0, 1]], [1 / 3] * 3)
    want = W @ (W @ (W @ Y))
    np.testing.assert_allclose(run.X.double().numpy(), want, rtol=0, atol=1e-6)
    assert not np.allclose(W @ Y, want, atol=1e-3)  # Q = 3 is not one step
    assert record["bytes_sent"] == 2 * N * 3 * run.bytes_per_model  # 10 directed edges x Q x model
    assert record["round"] == 1 and record["live"] == N and record["failed"] == []


def test_failed_nodes_keep_their_model_and_weights_renormalise(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, algorithm="dfedsam", topology="full")
    before = run.X.double().numpy().copy()
    updates = fake_updates(run, 0, nodes=[0, 1, 3, 4])  # node 2 timed out
    Y = stacked({i: u for i, u in updates.items() if i != 4}, run)  # node 4 answered but is reported failed
    record = run.finish_round(0, updates, failed=[4])
    alive = np.array([1, 1, 0, 1, 0], dtype=bool)
    W = mh_by_hand(build_topology("full", N), alive)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-15)
    np.testing.assert_allclose(run.X.double().numpy(), W @ Y, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(run.X.double().numpy()[[2, 4]], before[[2, 4]])
    live_mean = Y[[0, 1, 3]].mean(axis=0)  # full graph over 3 live nodes: exact averaging
    np.testing.assert_allclose(run.X.double().numpy()[[0, 1, 3]], np.tile(live_mean, (3, 1)), atol=1e-6)
    assert record["failed"] == [2, 4] and record["live"] == 3
    assert record["bytes_sent"] == 3 * 2 * run.bytes_per_model  # 3 live edges, both directions
    assert record["train_loss"] == pytest.approx((0 * 10 + 1 * 11 + 3 * 13) / (10 + 11 + 13))


def test_fedavg_gives_every_live_node_the_mean(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, algorithm="fedavg", topology="ring")
    updates = fake_updates(run, 0, nodes=[0, 1, 2, 3])
    Y = stacked(updates, run)
    record = run.finish_round(0, updates)
    got = run.X.double().numpy()
    for i in range(4):
        np.testing.assert_allclose(got[i], Y[:4].mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[4], Y[4])
    assert record["bytes_sent"] == 2 * 4 * run.bytes_per_model  # upload + download per live node


def test_round_metrics_follow_their_formulas(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, topology="ring")
    record = run.finish_round(0, fake_updates(run, 0))
    X = run.X.double().numpy()
    assert record["consensus_distance"] == pytest.approx(((X - X.mean(axis=0)) ** 2).sum() / N, rel=1e-9)
    cfg = run.cfg
    model = node_model(cfg, data).eval()

    def acc(row: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        model.load_state_dict(unflatten(row, run.spec))
        with torch.no_grad():
            return (model(x).argmax(1) == y).double().mean().item()

    assert record["test_acc"] == pytest.approx(acc(run.X.mean(dim=0), data.test_x, data.test_y), abs=1e-12)
    personal = [acc(run.X[i], n.test_x, n.test_y) for i, n in enumerate(data.nodes)]
    assert record["personal_acc_mean"] == pytest.approx(np.mean(personal), abs=1e-12)
    assert record["personal_acc_std"] == pytest.approx(np.std(personal), abs=1e-12)
    assert len(set(personal)) > 1  # the nodes' models differ: a real spread, not a constant
    assert record["compute_s"] == pytest.approx(0.5 * N) and record["time_s"] >= record["round_s"] > 0
    record2 = run.finish_round(1, fake_updates(run, 1))
    assert record2["bytes_sent"] == 2 * record["bytes_sent"] and record2["lr"] == pytest.approx(0.05 * 0.998)


def test_evaluation_every_k_rounds_and_at_the_last(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, eval_every=2, rounds=3)
    acc = [run.finish_round(r, fake_updates(run, r))["test_acc"] for r in range(3)]
    assert acc[0] is None and acc[1] is not None and acc[2] is not None
    summary = run.finish()
    assert summary["results"]["rounds"] == 3 and summary["results"]["test_acc"] == round(acc[2], 4)
    assert summary["spectral_gap"] == pytest.approx(1 - np.sort(np.abs(np.linalg.eigvalsh(
        mh_by_hand(build_topology("ring", N), np.ones(N, dtype=bool)))))[-2])
    for name in ("metrics.jsonl", "summary.json", "results.md", "results.csv", "curves.png", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name


def test_time_varying_topology_is_redrawn_per_round(tmp_path: Path, data: FederatedData) -> None:
    opts = {"k": 2}
    run = make_run(tmp_path, data, topology="random-k", topology_options=opts, time_varying=True)
    graphs = [run.adjacency(r) for r in range(6)]
    for r, adj in enumerate(graphs):
        np.testing.assert_array_equal(adj, topology_for_round("random-k", N, 0, r, time_varying=True, **opts))
    assert len({g.tobytes() for g in graphs}) > 1
    fixed = make_run(tmp_path / "b", data, topology="random-k", topology_options=opts)
    assert fixed.adjacency(0) is fixed.adjacency(5)


def test_simulated_failures_are_seeded_and_skipped(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, fail_prob=0.5, seed=3)
    drawn = [run.simulated_failures(r) for r in range(60)]
    assert drawn == [run.simulated_failures(r) for r in range(60)]
    rate = sum(map(len, drawn)) / (60 * N)
    assert 0.35 < rate < 0.65
    tasks = [i for i, _ in run.round_tasks(0)]
    assert tasks == [i for i in range(N) if i not in drawn[0]]
    record = run.finish_round(0, fake_updates(run, 0))
    assert record["failed"] == drawn[0]
    assert make_run(tmp_path / "b", data).simulated_failures(0) == []


def test_protocol_misuse_is_an_error(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data)
    with pytest.raises(ValueError, match="expected round 0"):
        run.finish_round(1, {})
    with pytest.raises(ValueError, match="unknown node ids"):
        run.finish_round(0, {7: ({}, {})})
    bad = {0: ({"head.weight": torch.zeros(3, 3)}, {"train_loss": 0.0, "num_examples": 1, "compute_s": 0.0})}
    with pytest.raises(ValueError, match="node 0: the returned model"):
        run.finish_round(0, bad)


def test_checkpoint_resume_and_fresh_start(tmp_path: Path, data: FederatedData) -> None:
    run = make_run(tmp_path, data, rounds=4)
    for r in range(2):
        run.finish_round(r, fake_updates(run, r))
    run.close()
    with make_run(tmp_path, data, rounds=4) as resumed:
        assert resumed.start_round == 2 and resumed.bytes_sent == run.bytes_sent
        assert torch.equal(resumed.X, run.X) and len(resumed.run.metrics()) == 2
    with make_run(tmp_path, data, rounds=10) as longer:  # more rounds continue the same run
        assert longer.start_round == 2
    with pytest.raises(ConfigError, match="different config"):
        make_run(tmp_path, data, rounds=4, lr=0.2)
    with pytest.raises(ConfigError, match="rounds: .* already ran 2 rounds"):
        make_run(tmp_path, data, rounds=1)
    with make_run(tmp_path, data, rounds=4, lr=0.2, resume=False) as fresh:
        assert fresh.start_round == 0 and fresh.run.metrics() == []
    with make_run(tmp_path, data, rounds=4, lr=0.2) as again:
        assert again.start_round == 0  # the stale checkpoint is gone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm": "dfedsamm"}, r"algorithm: unknown algorithm 'dfedsamm'; did you mean 'dfedsam'\? Allowed: .*dpsgd"),
        ({"topology": "rign"}, r"topology: unknown topology 'rign'.* Allowed: .*ring"),
        ({"partitioner": "dirichlett"}, r"partitioner: unknown partitioner 'dirichlett'.* Allowed: .*pathological"),
        ({"optimizer": "sma"}, r"optimizer: unknown optimizer 'sma'. Allowed: .*asam.*sgd"),
        ({"dataset": "mnist"}, r"dataset: unknown dataset 'mnist'.* Allowed: cifar10, cifar100, digits"),
        ({"model": "resnet"}, r"model: unknown model 'resnet'.* Allowed: .*resnet18"),
        ({"gossip_steps": 0}, r"gossip_steps: expected an integer >= 1, got 0"),
        ({"rho": 0.0}, r"rho: expected a value > 0, got 0.0"),
        ({"rho": -0.1}, r"rho: expected a value > 0"),
        ({"num_nodes": 1}, r"num_nodes: expected an integer >= 2"),
        ({"topology": "grid", "num_nodes": 7}, r"topology: 'grid' needs n = rows x cols"),
        ({"topology": "ring", "time_varying": True}, r"time_varying: only random topologies"),
        ({"topology_options": {"k": 3}}, r"topology.k: unknown option for 'ring'"),
        ({"local_epochs": 2, "local_steps": 3}, r"local_epochs, local_steps: set one of them"),
        ({"optimizer": "adam", "algorithm": "dfedavgm"}, r"momentum: the base optimizer 'adam' takes no momentum"),
        ({"optimizer_options": {"alpah": 0.1}, "optimizer": "gsam"}, r"optimizer 'gsam' .*alpah"),
        ({"fail_prob": 1.0}, r"fail_prob: expected a value in \[0.0, "),
        ({"device": "tpu"}, r"device: unknown device 'tpu'"),
    ],
)
def test_bad_config_is_rejected_with_the_field_and_allowed_values(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedConfig(**overrides)


def test_disconnected_topology_is_rejected(tmp_path: Path) -> None:
    adj = np.zeros((4, 4), dtype=int)
    adj[0, 1] = adj[1, 0] = adj[2, 3] = adj[3, 2] = 1
    np.savetxt(tmp_path / "two.csv", adj, delimiter=",", fmt="%d")
    with pytest.raises(ConfigError, match=r"topology: 'file' with n=4 is disconnected \(2 components: \[0, 1\], \[2, 3\]\)"):
        FedConfig(num_nodes=4, topology="file", topology_options={"path": str(tmp_path / "two.csv")})


def test_more_nodes_than_samples_is_rejected_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_nodes: digits has 1347 training samples, so at most 1347 nodes; got 5000"):
        FedConfig(num_nodes=5000, topology="full", out_dir=str(tmp_path), name="big")  # before any N x N graph
    with pytest.raises(ConfigError, match=r"num_nodes: at most 10,000"):
        FedConfig(num_nodes=100_000, dataset="cifar10", data_dir=str(tmp_path))
    assert not (tmp_path / "big").exists()  # nothing was written: no training started


def test_registered_training_sizes_are_the_real_ones() -> None:
    from fedsam.data import DATASETS, digits_source

    assert DATASETS.get("digits").num_train == len(digits_source().train)
