"""GAQAT: gradient-adaptive quantization-aware training for domain generalization (Jiang et al.,
arXiv 2412.05551; no public code, SEED_METHODS.md 4).

LSQ quantization-aware training (`shared.quant`) with SAGM, where the step sizes of the quantizers
get special care. SAGM's descent gradient d = (g + g_p) / 2 splits, for every parameter, into a
task part g (the gradient at w) and a smoothness part (g_p - g) / 2 (half the gradient of the
sharpness f(w + e) - f(w)). The paper finds that for the step sizes of some layers the two parts
conflict, and it freezes the task part of those step sizes, for good, when their "gradient disorder"
falls below a threshold, checked every K steps over a window of n steps.

The paper publishes neither the disorder's formula nor n, K and the threshold, so these are ours:
- disorder of a step size = the fraction of consecutive steps, over the last `window` steps, at which
  the sign of its smoothness gradient flips (reviewer 2's "number of direction flips of gradient for
  smoothing parameters over n training steps", normalised to [0, 1]; random signs give about 0.5);
- every `interval` steps, once `window` steps are recorded, a step size whose disorder is below
  `threshold` has its task gradient frozen from then on: its descent gradient is the smoothness part
  alone ("freezing only the task loss gradients for cases with low gradient disorder", reviewer 2;
  "continuously freezing the g_task without unfreezing", reviewer 6 quoting the paper);
- defaults window 20, interval 10, threshold 0.3, ablated in the README's evidence.
The other parameters (weights, biases) follow SAGM unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from shared.quant import QuantScale
from shared.sam.base import BaseOptimizerSpec, _Plan
from shared.sam.sagm import SAGM
from shared.validate import check_range


def gradient_disorder(signs: Tensor) -> Tensor:
    """(window, S) signs in time order -> (S,) the fraction of consecutive pairs that differ."""
    return (signs[1:] != signs[:-1]).float().mean(0)


class GAQAT(SAGM):
    """GAQAT over `base_optimizer`: SAGM's `rho` and `alpha`, and for the LSQ step sizes among the
    parameters (`shared.quant.QuantScale`) the disorder `window` (>= 2 steps), the check `interval`
    (>= 1 steps) and the `threshold` (in [0, 1]) below which a step size's task gradient is frozen."""

    batchable: ClassVar[bool] = False  # the step sizes' sign histories are kept for one model
    shardable: ClassVar[bool] = False  # the step sizes' gradient is reshaped as the whole tensor

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        alpha: float = 0.001,
        window: int = 20,
        interval: int = 10,
        threshold: float = 0.3,
        **kwargs: Any,
    ) -> None:
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window: expected an integer >= 2 (steps whose signs are compared), got {window!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval: expected an integer >= 1 (steps between checks), got {interval!r}")
        check_range("threshold", threshold, 0.0, 1.0)
        self.window, self.interval, self.threshold = window, interval, threshold
        self._signs: Tensor | None = None  # (window, S) ring of the smoothness gradients' signs
        self._frozen: Tensor | None = None  # (S,) 1.0 where the task gradient is frozen
        self._recorded = 0  # steps recorded
        self._scale_index: tuple[int, list[int]] | None = None  # (id of the plan, positions of the step sizes)
        super().__init__(params, base_optimizer, rho=rho, alpha=alpha, **kwargs)

    def _scales(self, plan: _Plan) -> list[int]:
        """Positions of the step sizes among the plan's parameters, found once per plan. Without
        any, GAQAT is SAGM (with a warning): the loops that check every member run it on plain models."""
        if self._scale_index is None or self._scale_index[0] != id(plan):
            found = [i for i, p in enumerate(plan.flat(plan.params)) if isinstance(p, QuantScale)]
            if not found and self._scale_index is None:
                warnings.warn("GAQAT: none of the perturbed parameters is an LSQ step size (shared.quant.QuantScale), "
                              "so it is SAGM here; quantize the model (shared.quant.quantize_model, quantize.bits=... "
                              "in samsuite train)", stacklevel=4)
            self._scale_index = (id(plan), found)
        return self._scale_index[1]

    def _descent_grads_(self, plan: _Plan) -> None:
        super()._descent_grads_(plan)  # d = (g + g_p) / 2
        grads = [p.grad for p in plan.flat(plan.params)]
        if any(g is None for g in grads):
            return
        index = self._scales(plan)
        if not index:
            return
        task = torch.stack([plan.flat(self._g0)[i].reshape(()) for i in index])
        descent = torch.stack([grads[i].reshape(()) for i in index])
        smooth = descent - task  # (g_p - g) / 2
        frozen = self._record(smooth)
        descent = descent - task * frozen
        torch._foreach_copy_([grads[i] for i in index], [d.reshape(grads[i].shape) for i, d in zip(index, descent)])

    @torch.no_grad()
    def _record(self, smooth: Tensor) -> Tensor:
        """Record the signs of this step's smoothness gradients; every `interval` steps freeze the
        step sizes whose disorder over the window is below the threshold. Returns the frozen mask."""
        if self._signs is None or self._signs.shape[1] != len(smooth):
            self._signs = torch.zeros(self.window, len(smooth), dtype=torch.int8, device=smooth.device)
            self._frozen = torch.zeros(len(smooth), dtype=smooth.dtype, device=smooth.device)
        self._signs = self._signs.to(smooth.device)  # no-ops but after loading a CPU checkpoint
        self._frozen = self._frozen.to(smooth.device, smooth.dtype)
        self._signs[self._recorded % self.window] = torch.sign(smooth).to(torch.int8)
        self._recorded += 1
        if self._recorded >= self.window and self._recorded % self.interval == 0:
            start = self._recorded % self.window  # the oldest entry of the ring
            ordered = torch.cat([self._signs[start:], self._signs[:start]])
            low = gradient_disorder(ordered) < self.threshold
            self._frozen = torch.maximum(self._frozen, low.to(self._frozen.dtype))
        return self._frozen

    @property
    def frozen(self) -> Tensor | None:
        """(S,) 1.0 for the step sizes (in parameter order) whose task gradient is frozen."""
        return self._frozen

    def metrics(self) -> dict[str, float]:
        return {} if self._frozen is None else {"gaqat_frozen_fraction": float(self._frozen.mean())}

    def member_state(self) -> dict[str, Any]:
        if self._signs is None:
            return {}
        return {"signs": self._signs.clone(), "frozen": self._frozen.clone(), "recorded": self._recorded}

    def load_member_state(self, state: dict[str, Any]) -> None:
        if "signs" in state:
            self._signs = state["signs"].to(torch.int8).clone()
            self._frozen = state["frozen"].clone()
            self._recorded = int(state["recorded"])
