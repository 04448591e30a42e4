"""A node's work: `local_update`, the single source of truth for the K local steps every engine
(in-process, Flower ClientApp) runs, and the evaluation of a model state on a node's or the
global test data. Plain functions of (state, node, round, config, data): no engine, no Flower.

Determinism: batch order, augmentation and any randomness inside the model come from
derive_seed(cfg.seed, "local", node, round), so a node's update depends only on its inputs
(x_i and, for members that keep state of their own, the node's member state), not on which
process runs it or in which order nodes are visited.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsam.config import FedConfig
from shared import Batch, Member, member_backward
from shared.config import ConfigError
from shared.seeding import derive_seed

if TYPE_CHECKING:
    from fedsam.partitions import FederatedData

EVAL_BATCH = 1024  # examples per forward pass when evaluating (bounds activation memory)

#: A local optimizer's own state (`shared.Member.member_state()`: tensors, nested dicts of tensors
#: and plain numbers); empty for optimizers without one (SGD, SAM, ...).
MemberState = dict[str, Any]

#: How a plain number of a member state travels in a message: as a 0-d tensor of this dtype.
_NUMBERS: dict[torch.dtype, type] = {torch.bool: bool, torch.int64: int, torch.float64: float}


def flatten_member_state(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """`state` as a flat dict of tensors, for a message's ArrayRecord: a nested dict's tensors
    under "name.key" (e.g. "ema.conv.weight"), a plain number as a 0-d tensor (bool, int64 or
    float64). One level of nesting (a model's state_dict under a name) is what members keep;
    names must have no dot, so `unflatten_member_state` can split each key at its first dot."""
    flat: dict[str, Tensor] = {}
    for name, value in state.items():
        if "." in name:
            raise ValueError(f"member state: the name {name!r} has a dot, which the flattening uses as its separator")
        if isinstance(value, Mapping):
            for key, tensor in value.items():
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"member state: {name}.{key} is a {type(tensor).__name__}; nested entries "
                                    "must be tensors (one level of nesting)")
                flat[f"{name}.{key}"] = tensor
        elif isinstance(value, Tensor):
            flat[name] = value
        elif isinstance(value, (bool, int, float)):
            dtype = torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.float64
            flat[name] = torch.tensor(value, dtype=dtype)
        else:
            raise TypeError(f"member state: {name} is a {type(value).__name__}; expected tensors, numbers or "
                            "dicts of tensors")
    return flat


def unflatten_member_state(flat: Mapping[str, Tensor]) -> MemberState:
    """The inverse of `flatten_member_state`: "name.key" entries back into a dict under name, and
    top-level 0-d bool/int64/float64 tensors back into numbers (members keep counters as numbers)."""
    state: MemberState = {}
    for key, tensor in flat.items():
        name, dot, rest = key.partition(".")
        if dot:
            state.setdefault(name, {})[rest] = tensor
        elif tensor.dim() == 0 and tensor.dtype in _NUMBERS:
            state[name] = _NUMBERS[tensor.dtype](tensor.item())
        else:
            state[name] = tensor
    return state


def federated_data(cfg: FedConfig) -> FederatedData:
    """The partitioned data of `cfg`, loaded once per process and settings (a Flower ClientApp
    worker calls this for every message). Partitions that cannot work are ConfigErrors."""
    return _load(cfg.dataset, cfg.num_nodes, cfg.partitioner, cfg.alpha, cfg.classes_per_node,
                 cfg.local_test_fraction, cfg.seed, cfg.data_dir, tuple(sorted(cfg.dataset_options.items())))


@functools.lru_cache(maxsize=4)
def _load(dataset: str, num_nodes: int, partitioner: str, alpha: float, classes_per_node: int,
          local_test_fraction: float, seed: int, data_dir: str | None,
          dataset_options: tuple[tuple[str, Any], ...]) -> FederatedData:
    from fedsam.data import load_federated

    try:
        data = load_federated(dataset, num_nodes, partitioner=partitioner, alpha=alpha, classes_per_node=classes_per_node,
                              local_test_fraction=local_test_fraction, seed=seed, data_dir=data_dir,
                              dataset_options=dict(dataset_options))
    except ValueError as err:  # its messages name the field (num_nodes, partitioner, data_dir, ...)
        raise ConfigError(str(err)) from None
    empty = [i for i, node in enumerate(data.nodes) if len(node.train_y) == 0]
    if empty:
        raise ConfigError(
            f"num_nodes: {len(empty)} of {num_nodes} nodes got no training example from partitioner={partitioner!r} "
            f"(nodes {empty[:8]}); use fewer nodes, a larger alpha or another partitioner"
        )
    return data


@functools.lru_cache(maxsize=4)
def _cached_model(name: str, num_classes: int, input_shape: tuple[int, ...], device: str) -> nn.Module:
    from fedsam.models import build_model

    return build_model(name, num_classes, input_shape).to(device)


def node_model(cfg: FedConfig, data: FederatedData) -> nn.Module:
    """The process's one working model of `cfg`'s architecture; callers load a state into it."""
    return _cached_model(cfg.model, data.num_classes, tuple(data.input_shape), str(cfg.torch_device))


def initial_state(cfg: FedConfig, data: FederatedData) -> dict[str, Tensor]:
    """Every node's starting model x_i^0 (the same for all nodes, as in the papers), drawn from
    derive_seed(seed, "init") without touching the global RNG."""
    from fedsam.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg.model, data.num_classes, tuple(data.input_shape))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch_indices(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """`steps` mini-batches of indices into n examples: successive random permutations cut into
    batches (the last of each pass may be smaller), so K = epochs x ceil(n / B) is whole epochs."""
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if done == steps:
                return
            yield idx
            done += 1


def node_batches(cfg: FedConfig, data: FederatedData, node: int, round_idx: int
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Node `node`'s K mini-batches of round `round_idx` as (x, y, idx), augmented: batch order and
    augmentation share one generator seeded by derive_seed(cfg.seed, "local", node, round_idx), so
    every engine that draws them this way gives the node the same batches."""
    local = data.nodes[node]
    n = len(local.train_y)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "local", node, round_idx))
    for idx in batch_indices(n, cfg.batch_size, cfg.local_step_count(n), gen):
        x, y = local.train_x[idx], local.train_y[idx]
        if data.augment is not None:
            x = data.augment(x, gen)
        yield x, y, idx


def mean_loss(losses: Tensor, sizes: list[int]) -> float:
    """A node's train_loss: the per-step mean losses weighted by the steps' batch sizes (float64)."""
    weights = torch.tensor(sizes, dtype=torch.float64)
    return float((losses.double().cpu() * weights).sum() / weights.sum())


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """One local step of any local optimizer (a SAM-family member or a plain base optimizer: one
    driver, so no optimizer is special-cased here). `idx`: the examples' positions in the node's
    training set, for members that keep per-example state. Returns the cross-entropy at the
    weights before the step (detached)."""
    stats = member_backward(opt, model, [Batch(x, y, idx)], F.cross_entropy)
    opt.step()
    return stats.loss


@overload
def local_update(state: Mapping[str, Tensor], node: int, round_idx: int, cfg: FedConfig, data: FederatedData,
                 *, member_state: None = None) -> tuple[dict[str, Tensor], dict[str, float]]: ...


@overload
def local_update(state: Mapping[str, Tensor], node: int, round_idx: int, cfg: FedConfig, data: FederatedData,
                 *, member_state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, float], MemberState]: ...


def local_update(
    state: Mapping[str, Tensor], node: int, round_idx: int, cfg: FedConfig, data: FederatedData,
    *, member_state: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]] | tuple[dict[str, Tensor], dict[str, float], MemberState]:
    """Node `node`'s local work in round `round_idx`: K steps of the local optimizer (every
    optimizer through `shared.member_backward`) from x_i = `state`, with lr decayed per round.
    Returns y_i (fresh tensors on cfg's device) and {"train_loss": mean cross-entropy over the
    examples seen, at the weights before each step, "num_examples": the node's training set size,
    "num_steps": K, "compute_s": seconds}.

    The optimizer is rebuilt every round (momentum restarts), but a member's own state (SAF's
    buffer of past logits and visit counts, MESA's EMA model, TRAM's target model) belongs to the
    node and lives on across rounds: pass the node's `member_state` (the one its previous round
    returned, {} at its first) and it is loaded before the first step, and the new state is
    returned third: (y_i, metrics, member state), {} for optimizers without one. Without
    `member_state` (None) the return is (y_i, metrics) and the member starts afresh. TRAM's
    target model is part of its state, so tram-init's target is the node's model at its first
    local step of the whole run (x_i^0, frozen), not at the start of each round, and tram-prev's
    is the model of the node's previous local step: for a round's first step, the weights of the
    previous round's last step (before that step's update and the mixing)."""
    t0 = time.perf_counter()
    device = cfg.torch_device
    n = len(data.nodes[node].train_y)
    model = node_model(cfg, data)
    model.load_state_dict(state)
    model.train()
    opt = cfg.local_optimizer(model.parameters(), round_idx)
    member = opt if isinstance(opt, Member) else Member()  # a plain base optimizer has no state of its own
    if member_state is not None:
        member.load_member_state(dict(member_state))
    losses, sizes = [], []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(cfg.seed, "local", node, round_idx))  # randomness inside the model (dropout)
        for x, y, idx in node_batches(cfg, data, node, round_idx):
            losses.append(_train_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx))
            sizes.append(len(idx))
    metrics = {"train_loss": mean_loss(torch.stack(losses), sizes), "num_examples": n, "num_steps": len(sizes),
               "compute_s": time.perf_counter() - t0}
    new_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if member_state is None:
        return new_state, metrics
    return new_state, metrics, member.member_state()


@torch.no_grad()
def evaluate_state(state: Mapping[str, Tensor], x: Tensor, y: Tensor, cfg: FedConfig, data: FederatedData
                   ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model `state` on (x, y), in eval mode, batched."""
    if len(y) == 0:
        raise ValueError("evaluate_state(): no examples to evaluate on")
    model = node_model(cfg, data)
    model.load_state_dict(state)
    model.eval()
    device = cfg.torch_device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(xb.to(device, non_blocking=True))
        yb = yb.to(device, non_blocking=True)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    return float(loss_sum) / len(y), int(correct) / len(y)
