"""A node's work: `local_update`, the single source of truth for the K local steps every engine
(in-process, Flower ClientApp) runs, and the evaluation of a model state on a node's or the
global test data. Plain functions of (state, node, round, config, data): no engine, no Flower.

Determinism: batch order, augmentation and any randomness inside the model come from
derive_seed(cfg.seed, "local", node, round), so a node's update depends only on its inputs,
not on which process runs it or in which order nodes are visited.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsam.config import FedConfig
from shared import SharpnessAware, sam_backward
from shared.config import ConfigError
from shared.seeding import derive_seed

if TYPE_CHECKING:
    from fedsam.data import FederatedData

EVAL_BATCH = 1024  # examples per forward pass when evaluating (bounds activation memory)


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


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One local step; returns the cross-entropy at the weights before the step (detached)."""
    if isinstance(opt, SharpnessAware):
        at_w: list[Tensor] = []

        def ascent(batch: tuple[Tensor, Tensor]) -> Tensor:
            logits = model(batch[0])
            loss = F.cross_entropy(logits, batch[1])
            at_w.append(loss.detach())
            return loss if opt.ascent_loss is None else opt.ascent_loss(logits, batch[1])

        sam_backward(opt, [(x, y)], lambda b: F.cross_entropy(model(b[0]), b[1]), ascent=ascent, model=model)
        loss = at_w[0]
    else:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        loss = loss.detach()
    opt.step()
    return loss


def local_update(
    state: Mapping[str, Tensor], node: int, round_idx: int, cfg: FedConfig, data: FederatedData
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Node `node`'s local work in round `round_idx`: K steps of the local optimizer (SAM-family
    members through `shared.sam_backward`) from x_i = `state`, with lr decayed per round.
    Returns y_i (fresh tensors on cfg's device) and {"train_loss": mean cross-entropy over the
    examples seen, at the weights before each step, "num_examples": the node's training set size,
    "num_steps": K, "compute_s": seconds}."""
    t0 = time.perf_counter()
    device = cfg.torch_device
    local = data.nodes[node]
    n = len(local.train_y)
    model = node_model(cfg, data)
    model.load_state_dict(state)
    model.train()
    opt = cfg.local_optimizer(model.parameters(), round_idx)
    steps = cfg.local_step_count(n)
    seed = derive_seed(cfg.seed, "local", node, round_idx)
    gen = torch.Generator().manual_seed(seed)
    losses, sizes = [], []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # randomness inside the model (dropout)
        for idx in batch_indices(n, cfg.batch_size, steps, gen):
            x, y = local.train_x[idx], local.train_y[idx]
            if data.augment is not None:
                x = data.augment(x, gen)
            losses.append(_train_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
            sizes.append(len(idx))
    weights = torch.tensor(sizes, dtype=torch.float64)
    train_loss = float((torch.stack(losses).double().cpu() * weights).sum() / weights.sum())
    new_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics = {"train_loss": train_loss, "num_examples": n, "num_steps": steps, "compute_s": time.perf_counter() - t0}
    return new_state, metrics


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
