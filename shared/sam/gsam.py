"""GSAM: surrogate gap guided SAM (Zhuang et al., ICLR 2022).

With g = grad f(w) and g_p = grad f(w + e), e = rho_t g / ||g||, GSAM descends along
    d = g_p - alpha * (g - (<g, g_p> / ||g_p||^2) g_p),
i.e. it also removes alpha times the component of g orthogonal to g_p (which lowers the surrogate
gap). rho_t follows the learning rate:
    rho_t = rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from shared.sam.base import BaseOptimizerSpec, SharpnessAware, _Plan, global_dot, global_norm, mul_rows_
from shared.sam.shards import local, locals_
from shared.validate import check_nonnegative


class GSAM(SharpnessAware):
    """GSAM. `rho_min=None` keeps rho constant; otherwise rho follows each group's lr between
    `lr_min` and `lr_max` (default: the group's `initial_lr` set by an LR scheduler, else its lr).
    The paper uses alpha in [0.01, 0.3]."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        lr_max: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("alpha", alpha)
        if rho_min is not None:
            check_nonnegative("rho_min", rho_min)
            if rho_min > rho:
                raise ValueError(f"rho_min: expected a value <= rho ({rho}), got {rho_min}")
        self._gsam_defaults = {"alpha": alpha, "rho_min": rho_min, "lr_min": lr_min, "lr_max": lr_max}
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._gsam_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        super()._check_group(group, index)
        check_nonnegative(f"param_groups[{index}].alpha", group["alpha"])
        if group["rho_min"] is not None:
            check_nonnegative(f"param_groups[{index}].rho_min", group["rho_min"])
            if group["rho_min"] > group["rho"]:
                raise ValueError(
                    f"param_groups[{index}].rho_min: expected a value <= rho ({group['rho']}), got {group['rho_min']}"
                )

    def _rho(self, group: dict[str, Any]) -> float:
        if group["rho_min"] is None:
            return group["rho"]
        lr_max = group["lr_max"] if group["lr_max"] is not None else group.get("initial_lr", group["lr"])
        if lr_max <= group["lr_min"]:
            raise ValueError(f"lr_max: expected a value > lr_min ({group['lr_min']}), got {lr_max}")
        frac = (group["lr"] - group["lr_min"]) / (lr_max - group["lr_min"])
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * frac

    def _before_perturb(self, plan: _Plan, grads: list[list[Tensor]]) -> None:
        self._g0 = self._keep_first_grads(plan, grads)

    def _descent_grads_(self, plan: _Plan) -> None:
        g0 = plan.flat(self._g0)
        gp = [p.grad for p in plan.flat(plan.params)]
        if all(g is None for g in gp):  # no second backward (the step is abandoned): only restore w
            return
        if any(g is None for g in gp):
            raise RuntimeError("GSAM: a perturbed parameter has no gradient at w + e")
        # d = g_p (1 + alpha <g, g_p> / ||g_p||^2) - alpha g, group by group (alpha may differ)
        like = plan.flat(plan.params)  # sharded parameters: the dot and norm over all shards
        gp = locals_(gp)
        ratio = global_dot(g0, gp, self.replicas, like) / (global_norm(gp, self.replicas, like) ** 2 + self.eps)
        for group, params, g0_group in zip(plan.groups, plan.params, self._g0):
            grads = [local(p.grad) for p in params]
            mul_rows_(grads, 1.0 + group["alpha"] * ratio)
            torch._foreach_add_(grads, g0_group, alpha=-group["alpha"])
