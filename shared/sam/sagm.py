"""SAGM: sharpness-aware gradient matching (Wang et al., CVPR 2023, "Sharpness-Aware Gradient
Matching for Domain Generalization"; reference code Wang-pengfei/SAGM, `sagm.py`, as copied into
the DomainBed code of UDIM, SEED_METHODS.md 4a).

With g = grad f(w) and g_p = grad f(w + e):
    e = (rho / ||g|| - alpha) g,     descent direction d = (g + g_p) / 2.
The perturbation starts from w - alpha g (the paper's L_p(w - alpha g)), and the descent averages
the gradients at w and at w + e, which aligns them (the gradient matching). We follow the code:
its half-sum is the paper's sum halved, so DomainBed's learning rates carry over. Defaults are
DomainBed's (rho 0.05, alpha 0.001).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from shared.sam.base import BaseOptimizerSpec, SharpnessAware, _Plan, global_norm, mul_rows_
from shared.sam.shards import locals_
from shared.validate import check_nonnegative


class SAGM(SharpnessAware):
    """SAGM over `base_optimizer`: `rho` (> 0) and `alpha` (>= 0; 0 gives SAM's e with the averaged
    descent). The reference has no adaptive variant in DomainBed; `adaptive=True` is refused."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        alpha: float = 0.001,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("alpha", alpha)
        if kwargs.get("adaptive"):
            raise ValueError("adaptive: SAGM perturbs along g itself (e = (rho / ||g|| - alpha) g); "
                             "use asam for the adaptive radius")
        self.alpha = alpha
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    scale_invariant: ClassVar[bool] = False  # alpha g grows with a loss scale; rho g / ||g|| does not

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        super()._check_group(group, index)
        if group["adaptive"]:
            raise ValueError(f"param_groups[{index}].adaptive: SAGM has no adaptive variant")

    def _before_perturb(self, plan: _Plan, grads: list[list[Tensor]]) -> None:
        self._g0 = self._keep_first_grads(plan, grads)

    def _perturbation_(self, plan: _Plan, work: list[list[Tensor]]) -> None:
        """work <- e = (rho / ||g|| - alpha) g, in place (the norm over every perturbed group); the
        gradients may carry a loss scale S, which rho g / ||g|| ignores and alpha g must divide out."""
        scale = self.eps + global_norm(plan.flat(work), self.replicas, like=plan.flat(plan.params))
        for group, g in zip(plan.groups, work):
            mul_rows_(g, self._rho(group) / scale - self.alpha / self.loss_scale)

    def _descent_grads_(self, plan: _Plan) -> None:
        grads = [p.grad for p in plan.flat(plan.params)]
        if all(g is None for g in grads):  # no second backward (the step is abandoned): only restore w
            return
        if any(g is None for g in grads):
            raise RuntimeError("SAGM: a perturbed parameter has no gradient at w + e")
        grads = locals_(grads)
        torch._foreach_add_(grads, plan.flat(self._g0))  # d = (g_p + g) / 2
        torch._foreach_mul_(grads, 0.5)
