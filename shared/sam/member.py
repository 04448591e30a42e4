"""The one contract between SAM-family members and the loops that use them.

A loop hands `member_backward` its model, the step's micro-batches as `Batch(inputs, targets, index)`
and its criterion, then calls `opt.step()`; it never names a member:

    stats = member_backward(opt, model, [Batch(x, y, idx)], F.cross_entropy)
    opt.step()

Whatever a member needs beyond the gradient comes through the hooks of `Member`, which the driver
calls at fixed points of the step:
- `bind(model)` once per step, before any pass: members that keep a copy of the model (MESA's EMA
  teacher, TRAM's previous or initial model) make it on the first call;
- `extra_loss(model, logits, batch)` after the first forward: a term added to the training loss
  at w (SAF's and MESA's trajectory loss); it sees the example indices (`batch.index`);
- `observe(model, logits, batch)` after the first forward: what the perturbation needs from it
  (TRAM's trust-region radius from a target model or noised inputs);
- `ascent_loss(logits, targets)`: the loss whose gradient sets e instead of the training loss (OBF);
- `anchor_loss(model, batch)`: a loss at w, after the other passes (the weights restored), whose
  gradient is added to the member's (UDIM's inconsistency term); None on a step where it adds nothing.
A plain base optimizer (SGD, AdamW) goes through the same driver with no hooks, so a loop treats
every optimizer alike.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Criterion = Callable[[Tensor, Tensor], Tensor]


class Batch(NamedTuple):
    """One micro-batch: the model's inputs (a tensor, or a dict of keyword inputs), the targets and,
    for members that keep per-example state (SAF), each example's position in the training set,
    which travels with the example through shuffling (a CPU int64 tensor)."""

    inputs: Any
    targets: Tensor
    index: Tensor | None = None


class Member:
    """The hooks of the contract, with do-nothing defaults (SAM, ASAM and GSAM need none).
    `driver_only` members need `member_backward` (they read the model, the logits or the indices);
    the others also work through `first_step`/`second_step`, `step(closure)` and `sam_backward`."""

    driver_only: ClassVar[bool] = False
    #: Whether the member can train R models stacked along each parameter's first dimension as R
    #: independent replicas (`SharpnessAware(..., replicas=R)`, fedsam's batched engine): its norms,
    #: inner products and state are then per row. False where a hook or state sees one model.
    batchable: ClassVar[bool] = False
    #: (forward-backward passes, forwards without gradient) of one step on one micro-batch: the least
    #: a step can cost, which `samsuite bench optim` times on its own as the member's floor.
    passes: ClassVar[tuple[int, int]] = (2, 0)
    #: OBF overrides this with a method `ascent_loss(logits, targets) -> Tensor`.
    ascent_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    #: UDIM overrides this with a method `anchor_loss(model, batch) -> Tensor | None`.
    anchor_loss: Callable[[nn.Module, Batch], Tensor | None] | None = None

    def bind(self, model: nn.Module) -> None:
        """Called with the model being trained at the start of every step."""

    def extra_loss(self, model: nn.Module, logits: Tensor, batch: Batch) -> Tensor | None:
        """A term added to the training loss at w (None: nothing to add)."""
        return None

    def observe(self, model: nn.Module, logits: Tensor, batch: Batch) -> None:
        """Sees each first-pass forward (at w) before the perturbation is formed."""

    def member_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the base optimizer's state (tensors and plain values)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """What a training loop logs about the member's own workings (TRAM's radius, GAQAT's frozen
        step sizes); plain numbers, read once per epoch."""
        return {}

    def load_member_state(self, state: dict[str, Any]) -> None:
        """Restore what `member_state` returned."""


MEMBER_KEY = "member"  # where a member's own state lives inside its state_dict()


def with_member_state(opt: Member, base_state: dict[str, Any]) -> dict[str, Any]:
    """A state_dict: the base optimizer's, plus the member's own state when it has any."""
    extra = opt.member_state()
    return {**base_state, MEMBER_KEY: extra} if extra else base_state


def split_member_state(opt: Member, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load the member's part of `state_dict`; returns the base optimizer's part."""
    state_dict = dict(state_dict)
    opt.load_member_state(state_dict.pop(MEMBER_KEY, {}))
    return state_dict


class ModelCopy:
    """A copy of the trained model without gradients, made at the first `bind` (MESA's EMA teacher,
    TRAM's target): its state is part of the member's state, and a state loaded before the copy
    exists waits for it."""

    def __init__(self, eval_mode: bool = False) -> None:
        self.module: nn.Module | None = None
        self.eval_mode = eval_mode
        self._pending: dict[str, Tensor] | None = None
        self._pairs: tuple[int, tuple[list[Tensor], ...]] | None = None  # (id of the model, its tensor lists)

    def ensure(self, model: nn.Module) -> nn.Module:
        if self.module is None:
            self.module = copy.deepcopy(model).requires_grad_(False)
            if self.eval_mode:
                self.module.eval()
            if self._pending is not None:
                self.module.load_state_dict(self._pending)
                self._pending = None
        return self.module

    def pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(copy's floating tensors, the model's, copy's other tensors, the model's): parameters and
        buffers matched in module order, for foreach updates; built once per model (walking the
        modules every step costs more than the update on small models)."""
        if self._pairs is None or self._pairs[0] != id(model):
            lists: tuple[list[Tensor], ...] = ([], [], [], [])
            for c, m in zip(model_tensors(self.module), model_tensors(model)):
                k = 0 if c.is_floating_point() else 2
                lists[k].append(c)
                lists[k + 1].append(m)
            self._pairs = (id(model), lists)
        return self._pairs[1]  # type: ignore[return-value]

    def state(self) -> dict[str, Tensor] | None:
        state = self.module.state_dict() if self.module is not None else self._pending
        return None if state is None else {k: v.detach().clone() for k, v in state.items()}

    def load(self, state: dict[str, Tensor]) -> None:
        if self.module is not None:
            self.module.load_state_dict(state)
        else:
            self._pending = dict(state)


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters then buffers, in module order (the same order in a deep copy). The parameters
    themselves, not `.data` views: a SAM step swaps `.data` and restores it."""
    return [*model.parameters(), *model.buffers()]


def forward_logits(model: nn.Module, inputs: Any) -> Tensor:
    """The model's logits: `model(inputs)`, or `model(**inputs).logits` for keyword inputs."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return getattr(out, "logits", out)


@dataclass
class StepLosses:
    """Mean losses of the step (detached tensors: no host sync until the caller asks)."""

    loss: Tensor  # the criterion at w, without any member's extra term
    perturbed_loss: Tensor | None = None  # the criterion at w + e (perturbing members)


def member_backward(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    micro_batches: Sequence[Batch | tuple[Any, ...]],
    criterion: Criterion = F.cross_entropy,
    *,
    m_sharpness: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> StepLosses:
    """Leave in `.grad` the step's gradient of any optimizer (a member or a plain base optimizer)
    over `micro_batches` (each weighing 1/k, see `sam_backward`); the caller then calls
    `opt.step()` or `scaler.step(opt)`. Tuples `(x, y)` or `(x, y, index)` are taken as `Batch`."""
    from shared.sam.backward import sam_backward
    from shared.sam.base import SharpnessAware
    from shared.sam.bn import frozen_bn_stats

    if not micro_batches:
        raise ValueError("micro_batches: expected at least one micro-batch, got none")
    batches = [b if isinstance(b, Batch) else Batch(*b) for b in micro_batches]
    hooks = opt if isinstance(opt, Member) else Member()
    hooks.bind(model)
    at_w: list[Tensor] = []

    def first_pass(batch: Batch) -> Tensor:
        logits = forward_logits(model, batch.inputs)
        loss = criterion(logits, batch.targets)
        at_w.append(loss.detach())
        hooks.observe(model, logits, batch)
        if hooks.ascent_loss is not None:
            return hooks.ascent_loss(logits, batch.targets)
        extra = hooks.extra_loss(model, logits, batch)
        return loss if extra is None else loss + extra

    anchor = None if hooks.anchor_loss is None else functools.partial(hooks.anchor_loss, model)
    if isinstance(opt, SharpnessAware):
        stats = sam_backward(opt, batches, lambda b: criterion(forward_logits(model, b.inputs), b.targets),
                             ascent=first_pass, anchor=anchor, m_sharpness=m_sharpness, scaler=scaler, model=model)
        return StepLosses(_mean(at_w), stats.descent_loss)
    opt.zero_grad()
    for batch in batches:
        loss = first_pass(batch) / len(batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if anchor is not None:
        with frozen_bn_stats(model):
            for batch in batches:
                loss = anchor(batch)
                if loss is not None:
                    loss = loss / len(batches)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
    return StepLosses(_mean(at_w))


def _mean(losses: list[Tensor]) -> Tensor:
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
