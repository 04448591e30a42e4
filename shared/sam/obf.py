"""OBF, "perturbed forgetting" (Vani et al., ICML 2024, "Forget Sharpness: Perturbed Forgetting
of Model Biases Within SAM Dynamics"; reference code BorealisAI/perturbed-forgetting).

The SAM ascent step does not climb the training loss but the output-bias forgetting objective
    J = (1 - a) * CE(p, y) - CE(p, uniform),   a = gamma * max(0, (1 - lam / p_y) / (1 - lam)),
lam = 1 / C (C the number of classes by default), p = sigmoid(logits) by default. As in the
reference code it is written in gradient form: d/dlogits = u - (a * p + (1 - a) * onehot(y)),
with p and a treated as constants. The descent step uses the ordinary training loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.sam.base import BaseOptimizerSpec, SharpnessAware
from shared.validate import check_range


def obf_ascent_loss(
    logits: Tensor, targets: Tensor, *, C: float | None = None, gamma: float = 1.0, sigmoid: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """A scalar whose gradient at the logits is the OBF ascent direction (mean over the batch).
    `C` is 1/lambda (None: the number of classes; negative: lambda = 0). Targets equal to
    `ignore_index` (padding, as in `F.cross_entropy`) are left out of the direction and the mean."""
    z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    num_classes = z.shape[-1]
    flat = targets.reshape(-1)
    keep = flat != ignore_index
    flat = torch.where(keep, flat, 0)
    p = torch.sigmoid(z) if sigmoid else F.softmax(z, dim=-1)
    onehot = F.one_hot(flat, num_classes).to(z)
    C = float(num_classes) if C is None else C
    if C > 0:
        lam = 1.0 / C
        p_y = p.gather(1, flat.reshape(-1, 1))
        a = gamma * ((1.0 - lam / p_y) / (1.0 - lam)).clamp_min(0.0)
    else:
        a = torch.full_like(z[:, :1], gamma)
    direction = (1.0 / num_classes - (a * p + (1.0 - a) * onehot)) * keep.unsqueeze(1)
    rows = (direction.to(logits.dtype) * logits.reshape(z.shape)).sum(-1)
    return rows.sum() / keep.sum().clamp_min(1)


class OBF(SharpnessAware):
    """SAM whose perturbation ascends the output-bias forgetting objective. The first pass must
    back-propagate `opt.ascent_loss(logits, targets)` instead of the training loss (the
    `sam_backward` driver does this when given the logits). Reference defaults: gamma 1 (ViT;
    its ResNet scripts use 1e-12), C = number of classes, sigmoid predictions, rho 0.04 with
    m = 64 on ImageNet."""

    shardable: ClassVar[bool] = False  # not tested on sharded parameters yet

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        gamma: float = 1.0,
        C: float | None = None,
        sigmoid: bool = True,
        **kwargs: Any,
    ) -> None:
        check_range("gamma", gamma, 0.0, 1.0)
        if C is not None and 0.0 <= C <= 1.0:
            raise ValueError(f"C: expected C > 1 (C = 1/lambda) or C < 0 (lambda = 0), got {C}")
        self.gamma, self.C, self.sigmoid = gamma, C, sigmoid
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def ascent_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return obf_ascent_loss(logits, targets, C=self.C, gamma=self.gamma, sigmoid=self.sigmoid)
