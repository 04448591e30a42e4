"""The SAM family on sharded parameters (DTensor, FSDP2's `fully_shard`), CPU and gloo, 2 processes.

Each rank trains its half of the batch; FSDP2 averages the gradients, so a step of 2 ranks with
b examples each is the step of 1 process with 2b. The weights after K steps of SAM, ASAM, GSAM
and SAGM (over SGD and AdamW, float64) must equal the single-process run's: e = rho g / ||g||
takes the norm over the whole model, not over a shard. Also the norm and dot themselves against
full tensors, for even, uneven and replicated placements, and the members that refuse shards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from suite_fixtures import on_gloo
from torch import nn

from shared import Batch, build_optimizer, member_backward
from shared.sam.base import global_dot, global_norm
from shared.sam.shards import shard_like

WORLD = 2
STEPS = 3
MEMBERS: list[tuple[str, str, dict[str, Any]]] = [
    ("sam", "sgd", {"momentum": 0.9}),
    ("sam", "adamw", {}),
    ("asam", "sgd", {}),
    ("gsam", "adamw", {"alpha": 0.3}),
    ("sagm", "sgd", {}),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 5 and 3 rows: uneven shards over 2 ranks (FSDP2 splits dim 0 as torch.chunk does)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (STEPS, 8), generator=gen)


def reduction_tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whole tensors for the norm and dot checks: 4 rows (even over 2 ranks), 3 (uneven), 2 x 2 (replicated)."""
    gen = torch.Generator().manual_seed(2)
    full = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64),
            torch.randn(2, 2, generator=gen, dtype=torch.float64)]
    return full, [t.flip(0) + 1 for t in full]


def train(model: nn.Module, member: str, base: str, options: dict[str, Any], rank: int = 0, world: int = 1
          ) -> nn.Module:
    opt = build_optimizer(member, list(model.parameters()), base, rho=0.1, lr=0.05, **options)
    xs, ys = data()
    per = xs.shape[1] // world
    for x, y in zip(xs, ys):
        part = slice(rank * per, (rank + 1) * per)
        member_backward(opt, model, [Batch(x[part], y[part])], F.cross_entropy)
        opt.step()
    return model


def _worker(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}
    for member, base, options in MEMBERS:
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        train(model, member, base, options, rank, WORLD)
        results[f"{member}-{base}"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    # the reductions themselves: even, uneven (3 rows over 2 ranks) and replicated tensors
    full, other = reduction_tensors()
    shards = [distribute_tensor(full[0], mesh, [Shard(0)]), distribute_tensor(full[1], mesh, [Shard(0)]),
              distribute_tensor(full[2], mesh, [Replicate()])]
    local = [s.to_local() for s in shards]
    local_other = [distribute_tensor(o, mesh, s.placements).to_local() for o, s in zip(other, shards)]
    results["shard_like"] = [bool(torch.equal(shard_like(f, s), s.to_local())) for f, s in zip(full, shards)]
    results["norm"] = global_norm(local, like=shards)
    results["dot"] = global_dot(local, local_other, like=shards)
    # members that keep whole-model state refuse sharded parameters with a clear message
    model = make_model()
    fully_shard(model, mesh=mesh)
    try:
        build_optimizer("tram-init", list(model.parameters()), "sgd", lr=0.1)
        results["tram"] = "accepted"
    except ValueError as err:
        results["tram"] = str(err)
    return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("shards")
    return on_gloo(_worker, WORLD, tmp)


@pytest.mark.parametrize(("member", "base", "options"), MEMBERS, ids=[f"{m}-{b}" for m, b, _ in MEMBERS])
def test_two_sharded_ranks_equal_one_process(sharded: dict[str, Any], member: str, base: str,
                                             options: dict[str, Any]) -> None:
    want = [p.detach() for p in train(make_model(), member, base, options).parameters()]
    got = sharded[f"{member}-{base}"]
    moved = [w - p.detach() for w, p in zip(want, make_model().parameters())]
    assert max(float(m.abs().max()) for m in moved) > 1e-3  # it trained
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_shard_norm_is_the_whole_tensors_norm(sharded: dict[str, Any]) -> None:
    full, other = reduction_tensors()
    flat, flat_other = torch.cat([t.reshape(-1) for t in full]), torch.cat([t.reshape(-1) for t in other])
    torch.testing.assert_close(sharded["norm"], flat.norm(), rtol=1e-12, atol=0)  # the replicated one counted once
    torch.testing.assert_close(sharded["dot"], flat @ flat_other, rtol=1e-12, atol=0)


def test_members_with_whole_model_state_refuse_shards(sharded: dict[str, Any]) -> None:
    assert sharded["tram"].startswith("TRAMInit does not support sharded (DTensor, e.g. FSDP2) parameters")


def test_a_full_tensor_is_cut_as_the_parameter_is_sharded(sharded: dict[str, Any]) -> None:
    """RS's noise: each rank draws the whole tensor and keeps its own shard (even, uneven, replicated)."""
    assert sharded["shard_like"] == [True, True, True]
