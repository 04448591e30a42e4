"""What every objective is made of: a forget loss and an optional retain loss, each a plain
function `(model, batch, ctx) -> loss`, plus an optional `setup` that computes what is cached once
before training (NPO's reference log-probs, RMU's frozen activations)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.registry import Registry
from unlearn.data import IGNORE, LMBatch, collate

if TYPE_CHECKING:
    from unlearn.train import UnlearnConfig

LossFn = Callable[[nn.Module, LMBatch, "ObjectiveContext"], Tensor]
OBJECTIVES: Registry[Objective] = Registry("objective")  # filled by the modules of this package


@dataclass
class ObjectiveContext:
    """What the losses read besides the model and the batch: the run's config (beta, delta,
    RMU's layer ...), the values `setup` cached (keyed by name, each indexed by sample index),
    and the autocast the loop trains under (so that cached values match the training forward)."""

    cfg: UnlearnConfig
    cache: dict[str, Tensor] = field(default_factory=dict)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class SetupData:
    """The tokenized sets (input_ids, attention_mask, labels) and the frozen reference model if the
    caller gave one; else the model given to `setup`, before any step, is the reference (no second
    copy in memory)."""

    forget: dict[str, Tensor]
    retain: dict[str, Tensor] | None
    ref_model: nn.Module | None = None


SetupFn = Callable[[nn.Module, "ObjectiveContext", SetupData], None]


@dataclass(frozen=True)
class Objective:
    """An unlearning objective: loss = forget(model, b_f, ctx) + gamma * retain(model, b_r, ctx).
    `retain` None means the objective has no retain term (GA, and plain fine-tuning "nll").
    `trainable(name, cfg)` restricts the updated parameters (RMU updates a few layers only)."""

    forget: LossFn
    retain: LossFn | None = None
    setup: SetupFn | None = None
    trainable: Callable[[str, UnlearnConfig], bool] | None = None


# ---------------------------------------------------------------------- shared pieces of losses
def token_logprobs(model: nn.Module, batch: LMBatch) -> Tensor:
    """[B, T-1] log p(x_t | x_<t) of each label token (0 where the label is padding), in float32 or
    wider (bf16 logits are upcast, as transformers does for its loss).

    Rows with left padding are run shifted to the left (right-padded, real tokens from column 0, as if
    alone) and the result shifted back: a left-padded row's padding positions attend to nothing, which
    some attention implementations (eager attention in float64) turn into NaN that the next layer
    spreads into the real positions, and whose gradient is NaN even where the loss masks it. Padding is
    selected out with torch.where, never multiplied by 0."""
    input_ids, attention_mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    width = input_ids.shape[1]
    lead = (attention_mask.cumsum(1) == 0).sum(1, keepdim=True)  # each row's left padding
    shifted = width > 1 and bool(lead.any())
    if shifted:
        columns = (torch.arange(width, device=lead.device) + lead) % width
        input_ids, attention_mask, labels = (t.gather(1, columns) for t in (input_ids, attention_mask, labels))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    predicted = targets != IGNORE
    nll = F.cross_entropy(logits.transpose(1, 2), torch.where(predicted, targets, 0), reduction="none")
    logprobs = torch.where(predicted, -nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
    if shifted:  # back to the batch's columns; a row's left padding maps to its (zero) tail
        logprobs = logprobs.gather(1, (torch.arange(width - 1, device=lead.device) - lead) % (width - 1))
    return logprobs


def sequence_logprob(model: nn.Module, batch: LMBatch) -> Tensor:
    """[B] log p(y | x) of each whole sequence: the sum over its label tokens (padding selected out)."""
    return token_logprobs(model, batch).sum(1)


def nll_loss(model: nn.Module, batch: LMBatch, ctx: ObjectiveContext) -> Tensor:
    """Mean token negative log-likelihood over the step (the usual causal-LM loss)."""
    return -token_logprobs(model, batch).sum() / batch.token_norm


def seq_mean(values: Tensor, batch: LMBatch) -> Tensor:
    """Mean over the step's sequences of per-sequence `values` (exact under accumulation)."""
    return values.sum() / batch.seq_norm


@torch.no_grad()
def per_sample(
    model: nn.Module, data: dict[str, Tensor], fn: Callable[[nn.Module, LMBatch], Tensor], batch_size: int,
    ctx: ObjectiveContext,
) -> Iterator[tuple[LMBatch, Tensor]]:
    """`fn(model, batch)` over `data` in eval mode (no dropout) under the training autocast, batch by
    batch: (batch, detached result). Used by `setup`s to cache values computed once.

    On several processes each rank computes its own slice of the rows, in the same number of
    passes as every other rank (a shorter slice repeats its last batch, so that the passes of a
    sharded model pair up); the caller sums its cache over the ranks
    (`unlearn.distributed.World.all_sum`: each row is filled by one rank, zero elsewhere)."""
    from unlearn.distributed import device_of, world

    w = world()
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        rows = torch.arange(len(data["input_ids"])).tensor_split(w.size)
        mine, longest = rows[w.rank], max(len(r) for r in rows)
        starts = list(range(0, len(mine), batch_size))
        passes = -(-longest // batch_size)
        for i in range(passes):
            start = starts[min(i, len(starts) - 1)]
            batch = collate(data, mine[start:start + batch_size]).to(device)
            with ctx.autocast():
                yield batch, fn(model, batch).detach()
    finally:
        model.train(was_training)

