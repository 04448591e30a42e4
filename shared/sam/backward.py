"""One driver for every member: gradient accumulation, m-sharpness, GradScaler, batch norm and a
term evaluated at w only (the retain loss of unlearning), in the order that is right for each.

    stats = sam_backward(opt, chunks, descent=lambda b: F.cross_entropy(model(b[0]), b[1]), model=model)
    opt.step()                  # or scaler.step(opt); scaler.update()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shared.sam.base import SharpnessAware
from shared.sam.bn import frozen_bn_stats

LossFn = Callable[[Any], Tensor]


@dataclass
class SamStepStats:
    """Mean losses of the step (detached tensors: no host sync until the caller asks)."""

    ascent_loss: Tensor  # the first pass, at w (the OBF objective for OBF)
    descent_loss: Tensor  # at w + e
    anchor_loss: Tensor | None = None  # at w, not perturbed


def sam_backward(
    opt: SharpnessAware,
    micro_batches: Sequence[Any],
    descent: LossFn,
    *,
    ascent: LossFn | None = None,
    anchor: LossFn | None = None,
    m_sharpness: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    model: torch.nn.Module | None = None,
) -> SamStepStats:
    """Leave in `.grad` the SAM-family gradient of the mean loss over `micro_batches`, with the
    weights restored; the caller then takes the base step with `opt.step()` or `scaler.step(opt)`.

    - `descent(batch)`: the training loss, evaluated at w + e.
    - `ascent(batch)`: the loss whose gradient sets e (default: `descent`; OBF's objective).
    - `anchor(batch)`: a loss evaluated at w only and added to the gradient (e.g. the retain
      term of unlearning: grad = grad l_f(w + e) + grad l_r(w)); None adds nothing for that batch.
    - `m_sharpness=False`: e comes from the gradient accumulated over all micro-batches (plain
      gradient accumulation, two sweeps). True: each micro-batch gets its own e and the perturbed
      gradients are averaged (m-sharpness, m = micro-batch size; use `chunk(batch, m)`).
    - `scaler`: fp16 loss scaling; e is scale invariant, so only `scaler.step` unscales (members
      whose e is not are told the scale: `SharpnessAware.scale_invariant`).
    - Each micro-batch's loss weighs 1/k: the mean of the micro-batch means, which is the full
      batch mean when the micro-batches have equal sizes (as `chunk` makes them, but the last).
    - `model`: its batch norm statistics are updated by the first (ascent) passes only, as a
      plain training step would update them; the passes at w + e and the anchor leave them.
    """
    if not micro_batches:
        raise ValueError("micro_batches: expected at least one micro-batch, got none")
    if opt.is_perturbed:
        raise RuntimeError("sam_backward(): the weights are already perturbed (first_step without second_step)")
    ascent = ascent or descent
    k = len(micro_batches)
    if not opt.scale_invariant:  # get_scale() waits for the device: only members that need it
        # with m-sharpness each e comes from one micro-batch's gradient, which weighs 1/k
        opt.loss_scale = (scaler.get_scale() if scaler is not None else 1.0) / (k if m_sharpness else 1)

    def backward(loss_fn: LossFn, batch: Any, weight: float) -> Tensor | None:
        loss = loss_fn(batch)
        if loss is None:  # an anchor with nothing to add on this step (UDIM's warm-up)
            return None
        scaled = loss * weight if weight != 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach()

    opt.zero_grad()
    if not m_sharpness:
        ascent_loss = _mean([backward(ascent, b, 1 / k) for b in micro_batches])
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            descent_loss = _mean([backward(descent, b, 1 / k) for b in micro_batches])
        opt.unperturb()
    else:
        ascent_loss = descent_loss = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            if i:
                opt.zero_grad(set_to_none=False)
            ascent_loss = ascent_loss + backward(ascent, batch, 1 / k) / k
            opt.first_step(zero_grad=True)
            with frozen_bn_stats(model):
                descent_loss = descent_loss + backward(descent, batch, 1 / k) / k
            opt.unperturb()
            grads, acc = opt.grads_with_buffers("m_sharpness_acc")
            (torch._foreach_add_ if i else torch._foreach_copy_)(acc, grads)
        torch._foreach_copy_(grads, acc)
    anchor_loss = None
    if anchor is not None:
        with frozen_bn_stats(model):
            losses = [loss for b in micro_batches if (loss := backward(anchor, b, 1 / k)) is not None]
            anchor_loss = _mean(losses) if losses else None
    return SamStepStats(ascent_loss, descent_loss, anchor_loss)


def _mean(losses: list[Tensor]) -> Tensor:
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def chunk(batch: Any, size: int) -> list[Any]:
    """Split a tensor, or a tuple/list/dict of tensors sharing dim 0, into micro-batches of `size`."""
    if size <= 0:
        raise ValueError(f"size: expected a micro-batch size > 0, got {size}")
    if isinstance(batch, Tensor):
        return list(batch.split(size))
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple (shared.Batch); None fields stay None
        pieces = [chunk(t, size) if t is not None else None for t in batch]
        count = len(next(p for p in pieces if p is not None))
        return [type(batch)(*(p[i] if p is not None else None for p in pieces)) for i in range(count)]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(parts) for parts in zip(*(chunk(t, size) for t in batch))]
    if isinstance(batch, dict):
        keys = list(batch)
        return [dict(zip(keys, parts)) for parts in zip(*(chunk(batch[key], size) for key in keys))]
    raise TypeError(f"chunk(): cannot split a {type(batch).__name__}; pass tensors, tuples, lists or dicts")
