"""Sharded parameters (DTensor: FSDP2's `fully_shard`, tensor parallelism) for the SAM family.

A member's arithmetic is element-wise (foreach ops on the weights, gradients and buffers) except
for its norms and inner products. Element-wise work runs on each rank's local shard (`local`),
which is exact whatever the sharding; torch has no sharding rule for most foreach ops anyway. A
norm or inner product sums over the local shards and then over the ranks that hold the other
shards (`all_reduce` over the mesh dimensions the tensor is sharded on; a replicated dimension
already holds the whole tensor, so it is not summed), so e = rho g / ||g|| uses the norm of the
whole model, as on one process. Plain tensors pass through unchanged, with no communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4 (the range pyproject.toml allows starts at 2.5)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = None  # type: ignore[assignment, misc]


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(t: Tensor) -> Tensor:
    """This rank's shard of `t` (a view: writing to it writes to `t`), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def locals_(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [local(t) for t in tensors]


def _sharded_dims(t: Any) -> tuple[Any, tuple[int, ...]]:
    """(the device mesh, its dimensions along which `t` is split) of a DTensor."""
    dims = tuple(i for i, p in enumerate(t.placements) if p.is_shard())
    if any(p.is_partial() for p in t.placements):
        raise ValueError("sharded parameters: a Partial placement is a pending reduction, not a parameter; "
                         "redistribute it to Shard or Replicate first")
    return t.device_mesh, dims


def reduce_sum(like: Sequence[Tensor], partial: Callable[[list[int]], Tensor]) -> Tensor:
    """The sum over all shards of `partial(index)`, a sum over the local tensors at positions
    `index`, where `like[i]` is the parameter whose sharding the i-th tensor follows: positions
    that share a sharding are summed locally, then all-reduced over the ranks that hold their
    other shards. Without a DTensor among `like`: `partial(all positions)`, no communication."""
    if not any_sharded(like):
        return partial(list(range(len(like))))
    by_sharding: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    meshes: dict[int, Any] = {}
    for i, t in enumerate(like):  # the same order on every rank, so the all-reduces pair up
        mesh, dims = _sharded_dims(t) if is_sharded(t) else (None, ())
        by_sharding.setdefault((id(mesh), dims), []).append(i)
        meshes[id(mesh)] = mesh
    total: Tensor | None = None
    for (mesh_id, dims), index in by_sharding.items():
        value = partial(index)
        for dim in dims:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=meshes[mesh_id].get_group(dim))
        total = value if total is None else total + value
    assert total is not None
    return total


def sum_of_squares(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """sum of t^2 over local tensors, in `dtype` (the partial sum of a global norm)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square().sum()


def shard_like(full: Tensor, p: Tensor) -> Tensor:
    """This rank's part of `full` (a tensor of `p`'s global shape) as `p` is sharded: what
    `local(p)` holds of it. Every rank passes the same `full` (e.g. noise from a generator seeded
    alike), so the part is cut locally, without communication; for a plain `p`, `full` itself."""
    if not is_sharded(p):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def whole(part: Tensor, p: Tensor) -> Tensor:
    """The whole tensor of which `part` is this rank's shard, sharded as `p` (a collective: every
    rank calls it); `part` itself for a plain `p`. The inverse of `shard_like`."""
    if not is_sharded(p):
        return part
    return DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
