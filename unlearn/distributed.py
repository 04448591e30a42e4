"""Unlearning on several processes through PyTorch's own distributed engine (`torchrun`), with the
same numbers as one process.

- `world()`: this process's rank and the world size (1 process when torch.distributed is not
  initialised: the caller, e.g. a script under torchrun, initialises it).
- `shard_model`: FSDP2 (`fully_shard`), one unit per decoder layer, the decoder and the root, the gradients
  summed rather than averaged over the ranks (each rank's loss already divides by the whole step's
  denominators, `unlearn.data`), bf16 compute with float32 reduction where the run asks for bf16.
- Each step's micro-batch of `batch_size x world` rows is cut into one slice per rank
  (`unlearn.data.make_micro_batches`): 2 ranks with micro-batch b compute the step of 1 process
  with 2b (tests/unlearn/test_distributed.py).
- Checkpoints hold whole tensors (gathered from the shards), so a run written by K processes
  resumes on K' (`gather`, `scatter_optimizer_state`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shared.config import ConfigError
from shared.sam.shards import is_sharded, shard_like

#: smoothers that cannot run on sharded parameters, and why
UNSHARDABLE = {"gp": "its penalty needs a double backward (autograd.grad with create_graph), which FSDP2's sharded "
                     "parameters do not support; use sam, asam, gsam, rs or wa, or run gp on one process"}


@dataclass(frozen=True)
class World:
    """This process's place among the processes of the run."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes run folders, logs and shows progress."""
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        """The sum of `t` over the ranks (in place; `t` itself on one process)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def check_world(cfg: Any, w: World) -> None:
    """What cannot run on `w.size` processes, as ConfigErrors naming the field, before any work."""
    if w.size == 1:
        return
    if cfg.smoother in UNSHARDABLE:
        raise ConfigError(f"smoother: {cfg.smoother} on {w.size} processes: {UNSHARDABLE[cfg.smoother]}")


def _units(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units, innermost first: every decoder layer, then the decoder itself (the module
    holding the layers, with the embeddings and final norm: RMU runs it alone), then the root."""
    for module in model.modules():
        for name in ("layers", "h"):
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers):
                return [*layers, module, model]
    raise ValueError(f"{type(model).__name__} has no list of decoder layers (layers or h) to shard")


def shard_model(model: nn.Module, w: World, *, bf16: bool = False) -> nn.Module:
    """FSDP2 over the ranks (`_units`), gradients summed over the ranks, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (w.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        unit.set_gradient_divide_factor(1.0)  # each rank's loss is its share of the step's: sum, not average
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered weight of a sharded model. FSDP2 keeps the root unit gathered after a
    forward without a backward (an evaluation); the smoothers write w + e, noise and averages into
    the shards, which a forward only sees once it gathers them again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ------------------------------------------------------------------------------------------ checkpoints
def full(t: Any) -> Any:
    """A DTensor gathered into the whole tensor (a collective: every rank calls it); others as they are."""
    return t.full_tensor() if is_sharded(t) else t


def gather(obj: Any) -> Any:
    """`obj` (nested dicts, lists, tensors) with every DTensor gathered whole, in a fixed order."""
    if isinstance(obj, Mapping):
        return {k: gather(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather(v) for v in obj)
    return full(obj)


def scatter_optimizer_state(state: dict[str, Any], params: Sequence[Tensor]) -> dict[str, Any]:
    """An optimizer state dict of whole tensors, with each sharded parameter's state cut as that
    parameter is sharded (the state of parameter i is keyed i, as `Optimizer.state_dict` does)."""
    out = dict(state)
    out["state"] = {
        i: {k: shard_like(v, params[int(i)]) if isinstance(v, Tensor) and v.shape == params[int(i)].shape else v
            for k, v in entry.items()}
        for i, entry in state["state"].items()
    }
    return out


def broadcast(obj: Any, w: World) -> Any:
    """Rank 0's `obj` on every rank (pickled; a checkpoint read by rank 0 alone)."""
    if w.size == 1:
        return obj
    box = [obj if w.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if is_sharded(p) else p.device
