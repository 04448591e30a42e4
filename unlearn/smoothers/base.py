"""What every smoother is: it builds the optimizer, leaves in `.grad` the step's gradient of
l_f + gamma * l_r (smoothed in its own way) over all micro-batches, and may act after each step
and at the end (weight averaging). Smoothing acts on the forget loss only (Fan et al. 2025)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer

from shared import build_optimizer
from shared.registry import Registry
from unlearn.data import LMBatch

if TYPE_CHECKING:
    from unlearn.train import UnlearnConfig

Pair = tuple[LMBatch, "LMBatch | None"]  # a forget micro-batch and its retain micro-batch
StepLoss = Callable[[Pair], Tensor]


@dataclass(frozen=True)
class StepTerms:
    """The two terms of the objective on a micro-batch pair; `retain` is unweighted and None when
    the objective has none (or gamma = 0)."""

    forget: StepLoss
    retain: StepLoss | None
    gamma: float

    def weighted_retain(self, pair: Pair) -> Tensor:
        return self.gamma * self.retain(pair)


def accumulate(loss_fn: StepLoss, micro_batches: Sequence[Pair], weight: float = 1.0) -> Tensor:
    """Backpropagate weight * mean over micro-batches of `loss_fn` (adding to `.grad`); returns
    the detached mean loss. Micro-batches carry the step's denominators, so this mean is the loss
    of the whole step's batch."""
    k = len(micro_batches)
    total = None
    for pair in micro_batches:
        loss = loss_fn(pair)
        (loss * (weight / k)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total / k


class Smoother:
    """No smoothing: grad = grad l_f(w) + gamma * grad l_r(w), accumulated over micro-batches."""

    def __init__(self, cfg: UnlearnConfig) -> None:
        self.cfg = cfg
        self.params: list[Tensor] = []

    def make_optimizer(self, params: list[Tensor]) -> Optimizer:
        """The optimizer over the trainable `params` (the base optimizer; SAM members wrap it)."""
        self.params = params
        return build_optimizer(self.cfg.base_optimizer, params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def backward(self, opt: Optimizer, micro_batches: Sequence[Pair], terms: StepTerms, step: int) -> dict[str, Tensor]:
        """Leave the step's gradient in `.grad`; returns the mean losses (detached tensors):
        "forget_loss", "retain_loss" (when there is a retain term) and smoother-specific ones."""
        opt.zero_grad()
        losses = {"forget_loss": accumulate(terms.forget, micro_batches)}
        return self._add_retain(losses, micro_batches, terms)

    @staticmethod
    def _add_retain(losses: dict[str, Tensor], micro_batches: Sequence[Pair], terms: StepTerms) -> dict[str, Tensor]:
        """+ gamma * grad l_r at the unperturbed weights (the same for every smoother)."""
        if terms.retain is not None:
            losses["retain_loss"] = accumulate(terms.retain, micro_batches, terms.gamma)
        return losses

    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based)."""

    def finish(self) -> None:
        """Called once after the last step."""

    @contextlib.contextmanager
    def delivered(self) -> Iterator[None]:
        """Inside: the weights the run would deliver if it ended at this step (what an evaluation during the
        run measures, e.g. a calibration of the budget); the training weights again after."""
        yield

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (for resume)."""


SMOOTHERS: Registry[type[Smoother]] = Registry("smoother")  # filled by the modules of this package
