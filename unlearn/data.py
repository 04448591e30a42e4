"""Texts -> causal-LM batches: right padding, labels -100 on padding, and micro-batches that
carry the step's loss denominators, so that gradient accumulation gives exactly the gradient of
one big batch (a token mean over the whole step, not a mean of per-micro-batch means)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

IGNORE = -100  # the label of a position that is not predicted (padding), as in transformers


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """input_ids, attention_mask and labels (input_ids, -100 on padding) for `texts`, right-padded
    to the longest text and truncated to `max_length` tokens."""
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string")
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    if max_length < 2:
        raise ValueError(f"max_length: expected a value >= 2 (one token and its successor), got {max_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length,
        padding_side="right", return_tensors="pt",
    )
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    # The mask, not the token id, marks padding: the pad token is often the eos token.
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class LMBatch:
    """One micro-batch. `index` holds each row's position in its data set (the key of cached
    reference values). The `*_norm` fields are the step's totals divided by its number of
    micro-batches: a loss that divides its sums by them, averaged over the micro-batches as every
    smoother does, equals the loss of the whole step's batch."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor
    token_norm: float  # predicted (label) tokens
    position_norm: float  # non-padding positions
    seq_norm: float  # sequences

    @property
    def predicted(self) -> Tensor:
        """[B, T-1] mask of the positions whose next token is a label (the shifted labels)."""
        return self.labels[:, 1:] != IGNORE

    def to(self, device: torch.device | str) -> LMBatch:
        tensors = ("input_ids", "attention_mask", "labels", "index")
        return replace(self, **{k: getattr(self, k).to(device) for k in tensors})


def collate(data: dict[str, Tensor], indices: Sequence[int] | Tensor) -> LMBatch:
    """The rows `indices` of tokenized `data` as one batch (its own denominators)."""
    return make_micro_batches(data, indices, 1)[0]


def make_micro_batches(data: dict[str, Tensor], indices: Sequence[int] | Tensor, k: int, rank: int = 0,
                       world_size: int = 1) -> list[LMBatch]:
    """Split the step's rows `indices` into `k` micro-batches of near-equal size, each trimmed to
    its longest sequence, with denominators taken over the whole step. On `world_size` processes,
    each micro-batch keeps only rank `rank`'s slice of its rows (the denominators stay the whole
    step's, so the ranks' losses sum to the one-process loss)."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if not 1 <= k <= len(index):
        raise ValueError(f"grad_accum: expected 1 <= micro-batches <= rows in the step ({len(index)}), got {k}")
    mask = data["attention_mask"][index]
    labels = data["labels"][index]
    norms = {
        "token_norm": (labels[:, 1:] != IGNORE).sum().item() / k,
        "position_norm": mask.sum().item() / k,
        "seq_norm": len(index) / k,
    }
    out = []
    for part in index.tensor_split(k):
        part = part.tensor_split(world_size)[rank]
        width = int(data["attention_mask"][part].sum(1).max())
        out.append(LMBatch(
            input_ids=data["input_ids"][part, :width],
            attention_mask=data["attention_mask"][part, :width],
            labels=data["labels"][part, :width],
            index=part,
            **norms,
        ))
    return out
