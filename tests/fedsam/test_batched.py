"""The batched engine (`engine=batched`): the SAM-family core on stacked replicas against one model
at a time in float64, the engine against the sequential one (float64: to rounding; float32: the
stated tolerance) for every algorithm with failures, time-varying graphs, masking of unequal step
counts and chunking, resume, and the errors for what cannot be batched."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from suite_fixtures import kill_after_first_checkpoint
from torch import nn

from fedsam import client
from fedsam.batched import BatchedTrainer, NodeLoss, StackedModel, batch_sizes, chunk_plan
from fedsam.client import batch_indices, federated_data, local_update
from fedsam.config import FedConfig
from fedsam.data import FederatedData
from fedsam.engine import run_batched, run_fed, run_inprocess
from fedsam.run import FedRun
from shared import Batch, build_optimizer, member_backward
from shared.config import ConfigError
from shared.runio import RunDir
from shared.sam.base import global_dot, global_norm

TIMING = ("compute_s", "round_s", "time_s")
#: float32 metrics of the two engines after a few rounds: vmap's grouped kernels sum in another
#: order, about 1e-7 relative per operation, grown by SAM's normalisation over the steps (measured
#: <= 5e-5 on consensus_distance, a difference of nearly equal models; <= 3e-6 elsewhere).
RTOL = 2e-4
#: Accuracies: a test example at a near-tie may flip under that rounding (measured: 1 of 450).
ACC_ATOL = 0.005


def small(tmp_path: Path, name: str, **kw: object) -> FedConfig:
    base: dict[str, object] = {"name": name, "out_dir": str(tmp_path), "num_nodes": 6, "rounds": 3, "batch_size": 16,
                               "alpha": 0.5}
    base.update(kw)
    return FedConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the core on stacked replicas
def test_per_replica_norm_and_dot_equal_a_loop_over_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 3, 5, generator=gen, dtype=torch.float64), torch.randn(4, 7, generator=gen, dtype=torch.float64)]
    b = [torch.randn_like(t) for t in a]
    norms = global_norm(a, 4)
    dots = global_dot(a, b, 4)
    for r in range(4):
        assert norms[r].item() == pytest.approx(float(torch.cat([t[r].reshape(-1) for t in a]).norm()), rel=1e-14)
        want = float(torch.cat([t[r].reshape(-1) for t in a]) @ torch.cat([t[r].reshape(-1) for t in b]))
        assert dots[r].item() == pytest.approx(want, rel=1e-13)
    assert global_norm(a).item() == pytest.approx(float(norms.norm()), rel=1e-14)


@pytest.fixture
def float64() -> Iterator[None]:
    """Default dtype float64, with fedsam's cached working model rebuilt in it (and after it)."""
    client._cached_model.cache_clear()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        client._cached_model.cache_clear()


def float64_data(cfg: FedConfig) -> FederatedData:
    """`cfg`'s data with float64 inputs."""
    data = federated_data(cfg)
    nodes = [dataclasses.replace(n, train_x=n.train_x.double(), test_x=n.test_x.double()) for n in data.nodes]
    return dataclasses.replace(data, nodes=nodes, test_x=data.test_x.double())


@pytest.mark.parametrize(("name", "options"), [
    ("sam", {}), ("asam", {"rho": 0.5}), ("gsam", {"alpha": 0.3}), ("sagm", {"alpha": 0.01}), ("obf", {}),
    ("sgd", {}), ("adamw", {}),
])
def test_stacked_replicas_step_as_each_replica_alone(float64: None, name: str, options: dict) -> None:
    """Three replicas of a small MLP, with unequal (padded) batches, 3 steps: the stacked member
    equals three separate optimizers to float64 rounding."""
    gen = torch.Generator().manual_seed(1)
    template = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    weights = [torch.randn(3, *p.shape, generator=gen) for p in template.parameters()]
    sizes = [6, 4, 1]
    xs = [torch.randn(3, n, 5, generator=gen) for n in sizes]
    ys = [torch.randint(0, 3, (3, n), generator=gen) for n in sizes]
    kwargs = {"lr": 0.1, **options} if name in ("sgd", "adamw") else {"lr": 0.1, "momentum": 0.9, **options}
    stacked = StackedModel(template, [w.clone() for w in weights])
    opt = build_optimizer(name, stacked.parameters(), **kwargs, **({} if name in ("sgd", "adamw") else {"replicas": 3}))
    for step in range(3):
        x = torch.zeros(3, 6, 5)
        y = torch.full((3, 6), -100)
        for j, n in enumerate(sizes):
            x[j, :n], y[j, :n] = xs[j][step], ys[j][step]
        member_backward(opt, stacked, [Batch(x, y)], NodeLoss(torch.tensor(sizes, dtype=torch.float64)))
        opt.step()
    for j, n in enumerate(sizes):
        alone = StackedModel(template, [w[j : j + 1].clone() for w in weights])
        solo = build_optimizer(name, alone.parameters(), **kwargs, **({} if name in ("sgd", "adamw") else {"replicas": 1}))
        for step in range(3):
            member_backward(solo, alone, [Batch(xs[j][step][None], ys[j][step][None])], NodeLoss(torch.tensor([float(n)])))
            solo.step()
        for w, w_alone in zip(stacked.weights, alone.weights):
            torch.testing.assert_close(w[j], w_alone[0], rtol=1e-12, atol=1e-13)


def test_replicas_is_refused_where_it_cannot_work() -> None:
    p = [torch.zeros(3, 2, requires_grad=True)]
    with pytest.raises(ValueError, match="replicas: expected an integer >= 1"):
        build_optimizer("sam", p, replicas=0)
    with pytest.raises(ValueError, match="replicas: TRAMPrev cannot treat stacked replicas"):
        build_optimizer("tram-prev", p, replicas=3)
    opt = build_optimizer("sam", p, replicas=4)
    p[0].grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"replicas: expected every perturbed parameter to stack 4 replicas"):
        opt.first_step()


# ------------------------------------------------------------------ the engine against the sequential one
def _rows(cfg: FedConfig, data: object, batched: bool) -> np.ndarray:
    """X after cfg.rounds rounds, by the sequential loop or the batched trainer, on `data`."""
    with FedRun(cfg, progress=False, data=data) as run:  # type: ignore[arg-type]
        trainer = BatchedTrainer(cfg, run.data, run.spec) if batched else None
        for r in range(run.rounds):
            tasks = run.round_tasks(r)
            updates = trainer.round(r, tasks) if trainer else {
                node: local_update(state, node, r, cfg, run.data) for node, state in tasks}
            run.finish_round(r, updates)
        return run.X.numpy().copy()


@pytest.mark.parametrize(("options", "chunk"), [
    ({"algorithm": "dfedsam"}, None),
    ({"algorithm": "dfedsam", "fail_prob": 0.3}, 4),  # failures, masking across uneven chunks
    ({"algorithm": "dfedavgm", "topology": "random-k", "topology_options": {"k": 2}, "time_varying": True}, 2),
    ({"algorithm": "dfedsam", "optimizer": "sam", "base_optimizer": "adam", "momentum": 0.0, "lr": 0.01}, 3),
])
def test_batched_engine_equals_sequential_in_float64(tmp_path: Path, float64: None, options: dict, chunk: int | None
                                                     ) -> None:
    """Non-IID nodes with unequal step counts (masked) and a short last batch (padded): X equals the
    sequential engine's to float64 rounding. Adam's step counter is shared by the rows, so its
    chunks hold equal step counts only."""
    cfg = small(tmp_path, "a", node_chunk=chunk, dataset="mnist1d", dataset_options={"num_samples": 800},
                model="cnn1d", rounds=2, **options)
    data = float64_data(cfg)
    steps = {cfg.local_step_count(len(n.train_y)) for n in data.nodes}
    assert len(steps) > 1 and any(len(n.train_y) % cfg.batch_size for n in data.nodes)  # masking and padding happen
    seq = _rows(cfg, data, batched=False)
    bat = _rows(dataclasses.replace(cfg, name="b"), data, batched=True)
    np.testing.assert_allclose(bat, seq, rtol=1e-9, atol=1e-11)


def test_chunked_passes_equal_one_pass_in_float64(tmp_path: Path, float64: None) -> None:
    cfg = small(tmp_path, "one", dataset="mnist1d", dataset_options={"num_samples": 800}, model="cnn1d", rounds=1)
    data = float64_data(cfg)
    whole = _rows(dataclasses.replace(cfg, node_chunk=cfg.num_nodes), data, batched=True)
    pieces = _rows(dataclasses.replace(cfg, name="two", node_chunk=2), data, batched=True)
    np.testing.assert_allclose(pieces, whole, rtol=1e-12, atol=1e-14)


def test_batch_sizes_follow_batch_indices() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, steps in ((40, 5), (7, 3), (64, 2), (33, 1)):
        assert batch_sizes(n, 16, steps) == [len(i) for i in batch_indices(n, 16, steps, gen)]


def test_chunk_plan_merges_runs_only_where_a_masked_padded_pass_is_cheaper() -> None:
    sizes = {0: [8, 8], 1: [8] * 5, 2: [8, 8], 3: [8, 8, 8], 4: [8] * 5}  # full batches of 8
    assert chunk_plan(sizes, 2, mask=True) == [[1, 4], [3], [0, 2]]
    # overhead 1: node 3 rides in the 5-step pass, 5 x (1 + 3) + 2 x (1 + 2) = 26, against 30 for one pass
    # and 5 x 3 + 3 x 2 + 2 x 3 = 27 for one per step count
    assert chunk_plan(sizes, 10, mask=True, overhead=1.0) == [[1, 4, 3], [0, 2]]
    assert chunk_plan(sizes, 10, mask=True, overhead=10.0) == [[1, 4, 3, 0, 2]]  # 75 < 117
    assert chunk_plan(sizes, 4, mask=True, overhead=10.0) == [[1, 4, 3], [0, 2]]  # 5 x 13 + 2 x 12 = 89
    assert chunk_plan(sizes, 10, mask=False, overhead=100.0) == [[1, 4], [3], [0, 2]]
    assert chunk_plan(sizes, 1, mask=True) == [[1], [4], [3], [0], [2]]
    # padding counts: one-step nodes of 8 and 1 examples cost (1 + 1) + (1 + 1/8) = 3.125 apart and
    # 1 + 2 = 3 together at overhead 1; at overhead 0.2, 1.2 + 0.325 = 1.525 apart < 2.2 together
    assert chunk_plan({0: [8], 1: [1]}, 2, mask=True, overhead=1.0) == [[0, 1]]
    assert chunk_plan({0: [8], 1: [1]}, 2, mask=True, overhead=0.2) == [[0], [1]]


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(path).metrics()]


def _assert_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], **({"abs": ACC_ATOL} if "acc" in k else {"rel": RTOL, "abs": 1e-7})), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("algorithm", ["dfedsam", "dfedsam-mgs", "dfedavg", "dfedavgm", "dpsgd", "fedavg", "fedsam"])
def test_batched_metrics_equal_sequential(tmp_path: Path, algorithm: str) -> None:
    """Every algorithm, with failures and a time-varying random graph, float32: the same metrics."""
    kw = {"algorithm": algorithm, "fail_prob": 0.25, "topology": "random-k", "topology_options": {"k": 2},
          "time_varying": True}
    run_inprocess(small(tmp_path, "seq", **kw), progress=False)
    run_fed(small(tmp_path, "bat", engine="batched", node_chunk=4, **kw), progress=False)
    seq, bat = _metrics(tmp_path / "seq"), _metrics(tmp_path / "bat")
    assert any(r["failed"] for r in seq)
    _assert_close(seq, bat)


def test_batched_run_killed_after_a_round_resumes_as_uninterrupted(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"engine": "batched", "dataset": "mnist1d", "dataset_options": {"num_samples": 800}, "model": "cnn1d"}
    run_batched(small(tmp_path, "whole", **kw), progress=False)
    kill_after_first_checkpoint(monkeypatch, lambda: run_batched(small(tmp_path, "killed", **kw), progress=False))
    assert len(RunDir(tmp_path / "killed").metrics()) == 1
    run_batched(small(tmp_path, "killed", **kw), progress=False)
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "whole")


def test_unbatchable_optimizer_or_model_is_refused_or_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                 ) -> None:
    with pytest.raises(ConfigError, match="engine: batched cannot run optimizer='saf'"):
        small(tmp_path, "x", engine="batched", optimizer="saf")
    with pytest.raises(ConfigError, match="node_chunk: expected an integer >= 1"):
        small(tmp_path, "x", engine="batched", node_chunk=0)
    with pytest.raises(ConfigError, match="engine: batched cannot run this config: model='digits-cnn'.*buffers"):
        run_fed(small(tmp_path, "bn", engine="batched", model="digits-cnn"), progress=False)
    assert not (tmp_path / "bn").exists()  # refused before the run folder is made
    summary = run_fed(small(tmp_path, "auto", engine="auto", optimizer="saf", rounds=1), progress=False)
    assert "engine=auto runs in-process (one node at a time): optimizer='saf'" in capsys.readouterr().out
    assert summary["final"]["round"] == 1


def test_vectorized_personal_evaluation_equals_one_node_at_a_time(tmp_path: Path, float64: None) -> None:
    """Nodes with local test splits of different sizes, in chunks smaller than N: the same accuracies."""
    cfg = small(tmp_path, "ev", node_chunk=4, dataset="mnist1d", dataset_options={"num_samples": 800}, model="cnn1d")
    data = float64_data(cfg)
    assert len({len(n.test_y) for n in data.nodes}) > 1
    with FedRun(cfg, progress=False, data=data) as run:
        X = run.X + 0.05 * torch.randn(run.X.shape, generator=torch.Generator().manual_seed(0))  # nodes differ
        trainer = BatchedTrainer(cfg, run.data, run.spec)
        assert trainer.evaluate_nodes(X) == run.evaluate_nodes(X)
        assert len(set(run.evaluate_nodes(X))) > 1
