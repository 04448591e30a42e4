"""Unlearning on several processes through PyTorch's own distributed engine (`torchrun`), with the
same numbers as one process.

- `world()`: this process's rank and the world size (1 process when torch.distributed is not
  initialised: the caller, e.g. a script under torchrun, initialises it).
- `shard_model`: FSDP2 (`fully_shard`), one unit per decoder layer, the decoder and the root, the gradients
  summed rather than averaged over the ranks (each rank's loss already divides by the whole step's
  denominators, `unlearn.data`), bf16 compute with float32 reduction where the run asks for bf16.
- `batch_size` is the whole step's micro-batch whatever the number of processes: each rank takes
  batch_size / world of its rows (`unlearn.data.make_micro_batches`), so the same config on 1, 2 or
  K processes computes the same step (tests/unlearn/test_distributed.py); a world that does not
  divide the batch is refused.
- Checkpoints hold whole tensors (gathered from the shards), so a run written by K processes
  resumes on K' (`gather`, `scatter_optimizer_state`); so do saved models (`save_model`).
- Rank 0 alone reads and writes run folders (`on_main`: the others receive what it found, or raise
  its error); the evaluation shares its batches out (`unlearn.eval.batching.rank_batches`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shared.config import ConfigError
from shared.runio import RunDir
from shared.sam.shards import any_sharded, is_sharded

T = TypeVar("T")

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


#: the rendezvous file of the processes `--nproc` starts on one machine (no TCP store to listen on)
INIT_FILE_ENV = "SAMSUITE_INIT_FILE"


@contextlib.contextmanager
def processes(device: str = "cpu") -> Iterator[World]:
    """The process group that torchrun (or `--nproc`) describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, MASTER_PORT), joined for the length of a command and left at its end: gloo on CPU,
    nccl on CUDA with one GPU per process (LOCAL_RANK, which "cuda" then means). A single process,
    or one already in a group, joins nothing."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init = os.environ.get(INIT_FILE_ENV)
        rendezvous = {"init_method": f"file://{init}", "rank": int(os.environ["RANK"]),
                      "world_size": int(os.environ["WORLD_SIZE"])} if init else {}
        dist.init_process_group("nccl" if cuda else "gloo", **rendezvous)
    try:
        yield world()
    finally:
        if joined:
            dist.destroy_process_group()


def on_main(fn: Callable[[], T], w: World | None = None) -> T:
    """`fn()` run by rank 0 alone, and its result on every rank, or its error raised on every rank
    (so that all stop alike, with rank 0's message): rank 0 reads and writes the run folder, the
    others learn what it found."""
    w = w or world()
    if w.size == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if w.main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
            error = err
    result, error = broadcast((result, error), w)
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def claim_on_main(out_dir: str | Path, name: str, kind: str, w: World | None = None) -> Iterator[RunDir]:
    """`RunDir.claim` by rank 0 (its refusal raised on every rank); the other ranks hold a handle on
    the same folder, which they never write."""
    w = w or world()
    claimed: list[RunDir] = []
    on_main(lambda: claimed.append(RunDir.acquire(out_dir, name, kind)), w)
    try:
        yield claimed[0] if claimed else RunDir(Path(out_dir) / name)
    finally:
        if claimed:
            claimed[0].release()


def barrier(w: World | None = None) -> None:
    """Wait for every rank (e.g. until rank 0 has written a model the others load)."""
    if (w or world()).size > 1:
        dist.barrier()


def check_world(cfg: Any, w: World) -> None:
    """What cannot run on `w.size` processes, as ConfigErrors naming the field, before any work."""
    if w.size == 1:
        return
    if cfg.smoother in UNSHARDABLE:
        raise ConfigError(f"smoother: {cfg.smoother} on {w.size} processes: {UNSHARDABLE[cfg.smoother]}")
    if cfg.batch_size % w.size:
        fits = [k for k in range(1, cfg.batch_size + 1) if cfg.batch_size % k == 0]
        raise ConfigError(f"batch_size: {_count(cfg.batch_size, 'row')} per micro-batch cannot be shared evenly by "
                          f"{w.size} processes; use a multiple of {w.size}, or {', '.join(map(str, fits))} "
                          f"process{'es' if fits != [1] else ''} (--nproc)")


def check_split(field: str, count: int, w: World) -> None:
    """`count` rows (texts, samples) shared by `w.size` processes: at least one each."""
    if count < w.size:
        raise ConfigError(f"{field}: {_count(count, 'text')} cannot be split over {w.size} processes; use at most "
                          f"{_count(count, 'process')} (--nproc)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _units(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units, innermost first: every decoder layer, then the root (with the embeddings, the final
    norm and the head: a head tied to the embeddings must share their unit, FSDP2 refuses a parameter
    in two units)."""
    for module in model.modules():
        for name in ("layers", "h"):
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers):
                return [*layers, model]
    raise ValueError(f"{type(model).__name__} has no list of decoder layers (layers or h) to shard")


def shard_model(model: nn.Module, w: World, *, bf16: bool = False) -> nn.Module:
    """FSDP2 over the ranks (`_units`), gradients summed over the ranks, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_of(model).type, (w.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        unit.set_gradient_divide_factor(1.0)  # each rank's loss is its share of the step's: sum, not average
        # a plain SUM: FSDP would scale fp32/bf16 gradients with NCCL's PREMUL_SUM, which gloo lacks
        unit.set_force_sum_reduction_for_comms(True)
    left = [n for n, p in model.named_parameters() if not is_sharded(p)]
    if left:  # their gradients would not be summed over the ranks
        raise ValueError(f"{type(model).__name__}: parameters outside every FSDP unit: {', '.join(left[:5])}")
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
    """An optimizer state dict of whole tensors, with each sharded parameter's state sharded as that
    parameter is (a DTensor, as the optimizer keeps it; the state of parameter i is keyed i, as
    `Optimizer.state_dict` does)."""

    def like(v: Any, p: Tensor) -> Any:
        if not (is_sharded(p) and isinstance(v, Tensor) and v.shape == p.shape):
            return v
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)

    out = dict(state)
    out["state"] = {i: {k: like(v, params[int(i)]) for k, v in entry.items()} for i, entry in state["state"].items()}
    return out


def broadcast(obj: Any, w: World) -> Any:
    """Rank 0's `obj` on every rank (pickled; a checkpoint read by rank 0 alone)."""
    if w.size == 1:
        return obj
    box = [obj if w.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_model(model: nn.Module, tokenizer: Any, folder: str | Path, w: World | None = None) -> None:
    """`model` and `tokenizer` in Hugging Face format, written by rank 0 once every rank may load them:
    a sharded model's weights are gathered whole first (every rank calls this)."""
    w = w or world()
    state = None
    if any_sharded(model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if w.main:
        model.save_pretrained(folder, state_dict=state)
        tokenizer.save_pretrained(folder)
        if state is not None:  # save_pretrained named FSDP's wrapper class (FSDPLlamaForCausalLM) the architecture
            from torch.distributed.fsdp import FSDPModule

            model.config.architectures = [next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__]
            model.config.save_pretrained(folder)
    barrier(w)


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if is_sharded(p) else p.device
