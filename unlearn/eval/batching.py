"""Batching shared by the scorers: length-sorted batches, left padding with the position ids that
make a padded row compute what it computes alone, evaluation mode restored afterwards (the
scorers run inside training loops), and the batches shared by the processes of a multi-process
run (`rank_batches`, `gather_rows`): every process computes its batches, the values are gathered,
and the metric is computed on all of them, as on one process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from shared.sam.shards import any_sharded
from shared.validate import check_positive
from unlearn.distributed import device_of, world


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() and no gradients inside; the caller's training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (as lm-eval orders its requests: less
    padding, and an out-of-memory error shows at once rather than at the end)."""
    check_positive("batch_size", batch_size)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def rank_batches(batches: Sequence[list[int]], model: torch.nn.Module) -> list[tuple[list[int], bool]]:
    """This process's share of `batches`, as (batch, kept): batch j goes to rank j mod world, whole, so
    that each row is computed in the batch it has on one process (the same padding, the same numbers).
    On a sharded model every forward is a collective, so a rank with fewer batches computes batch 0
    once more (kept False: its values are dropped) to make as many forward passes as the others."""
    w = world()
    if w.size == 1:
        return [(list(b), True) for b in batches]
    mine = [(list(b), True) for b in batches[w.rank :: w.size]]
    if is_sharded_model(model):
        mine += [(list(batches[0]), False)] * (-(-len(batches) // w.size) - len(mine))
    return mine


def gather_rows(values: Mapping[Any, Any]) -> dict[Any, Any]:
    """The union over the processes of the values each computed (keyed by row); `values` on one process."""
    w = world()
    if w.size == 1:
        return dict(values)
    import torch.distributed as dist

    parts: list[Any] = [None] * w.size
    dist.all_gather_object(parts, dict(values))
    return {k: v for part in parts for k, v in part.items()}


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are shards (FSDP): then each forward pass is a collective."""
    return any_sharded(model.parameters())


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows: every row ends at the last
    column, and its real tokens keep positions 0..n-1 as if it ran alone."""
    ids = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                       padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True,
                        padding_value=0, padding_side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    return next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def model_device(model: PreTrainedModel) -> torch.device:
    return device_of(model)


def at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 for the log-softmax; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
