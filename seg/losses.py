"""UU-Mamba's uncertainty-aware segmentation loss, with the reference's defects fixed (SEED_METHODS 6f).

    L = sum_k  L_k / (2 s_k^2) + log(1 + s_k^2),   k in {dice, ce, focal},   s_k learnable, initialised to 1

(`AutomaticWeightedLoss`: the log(1 + s^2) variant of homoscedastic weighting). The terms are nnU-Net's
`MemoryEfficientSoftDiceLoss` (softmax, foreground classes only, smooth 1e-5), cross entropy, and the
reference's `FocalLoss` (alpha 0.5, gamma 2, label smoothing 1e-5). Differences from the reference code:

- the Dice term is 1 - Dice, not -Dice: with a negative L_k, L_k / (2 s_k^2) -> -inf as s_k -> 0, so trained
  weights would make the objective unbounded (6f.2); with every L_k >= 0 the loss is bounded below by 0;
- the focal term applies softmax once (the reference applies it twice, 6f.3), on the device of the logits;
- the s_k are parameters of this module: an optimizer built over `loss.parameters()` trains them (the
  reference registers the weights of a loss it then replaces, so they are never trained, 6f.1).

`DeepSupervisionLoss` applies the loss to each output of a deep-supervised network with nnU-Net's weights.

Written by hand rather than with MONAI's losses: MONAI has no uncertainty weighting, and its `DiceLoss` and
`FocalLoss` reduce differently from the nnU-Net terms the reference uses (batch Dice over the foreground
classes, the reference's label smoothing). MONAI's losses serve as the tests' references instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_TERMS", "DeepSupervisionLoss", "UncertaintyLoss", "deep_supervision_weights", "dice_loss",
           "focal_loss"]

LOSS_TERMS = ("dice", "ce", "focal")


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    """logits (batch, classes >= 2, *spatial) and integer labels (batch, *spatial) with values in 0..classes-1."""
    if logits.dim() < 3 or logits.shape[1] < 2:
        raise ValueError(f"logits: expected (batch, classes >= 2, *spatial), got shape {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor of class indices, got {labels.dtype}")
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: labels must be "
                         f"(batch, *spatial) = {tuple(logits.shape[:1] + logits.shape[2:])}")
    classes = logits.shape[1]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(f"labels: value {low if low < 0 else high} outside the classes 0..{classes - 1}")


def _wide(logits: Tensor) -> Tensor:
    """The logits in float32 at least: the losses of half-precision (autocast) outputs are computed in float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _onehot(labels: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(labels.long(), classes).movedim(-1, 1).to(dtype)


def _dice(logits: Tensor, labels: Tensor, smooth: float, batch_dice: bool) -> Tensor:
    probs = torch.softmax(_wide(logits), dim=1)[:, 1:]
    onehot = _onehot(labels, logits.shape[1], probs.dtype)[:, 1:]
    axes = ((0,) if batch_dice else ()) + tuple(range(2, logits.dim()))  # sums per class (and per sample)
    intersect = (probs * onehot).sum(axes)
    denominator = (probs.sum(axes) + onehot.sum(axes) + smooth).clamp_min(1e-8)
    return 1 - ((2 * intersect + smooth) / denominator).mean()


def _focal(logits: Tensor, labels: Tensor, alpha: float, gamma: float, smooth: float) -> Tensor:
    classes = logits.shape[1]
    probs = torch.softmax(_wide(logits), dim=1)
    target = _onehot(labels, classes, probs.dtype)
    if smooth:
        target = target.clamp(smooth / (classes - 1), 1 - smooth)
    p_t = (target * probs).sum(1) + smooth
    return (-alpha * (1 - p_t).pow(gamma) * p_t.log()).mean()


def dice_loss(logits: Tensor, labels: Tensor, smooth: float = 1e-5, batch_dice: bool = True) -> Tensor:
    """1 - soft Dice of softmax(logits), averaged over the foreground classes (nnU-Net's MemoryEfficientSoftDiceLoss
    with do_bg=False, returning 1 - Dice instead of -Dice). With `batch_dice` the sums run over the batch too
    (nnU-Net's 2d plans), otherwise Dice is per sample and class, then averaged."""
    _check_inputs(logits, labels)
    return _dice(logits, labels, smooth, batch_dice)


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.5, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Focal loss -alpha (1 - p_t)^gamma log p_t averaged over pixels, with one softmax. As the reference's
    FocalLoss: the one-hot target is clamped to [smooth/(C-1), 1-smooth] and p_t = <target, softmax> + smooth
    (smooth=0 gives the textbook focal loss); a float alpha weighs every class alike."""
    _check_inputs(logits, labels)
    return _focal(logits, labels, alpha, gamma, smooth)


class UncertaintyLoss(nn.Module):
    """sum_k L_k / (2 s_k^2) + log(1 + s_k^2) over `terms` (any of "dice", "ce", "focal"), one learnable s_k each,
    initialised to 1. `weighted=False` gives the plain sum of the terms (the ablation without the uncertainty
    weighting; then there are no parameters). Register `parameters()` with the optimizer (weight decay 0, as
    the reference)."""

    def __init__(self, terms: Sequence[str] = LOSS_TERMS, weighted: bool = True, *, batch_dice: bool = True,
                 smooth: float = 1e-5, focal_alpha: float = 0.5, focal_gamma: float = 2.0) -> None:
        super().__init__()
        terms = (terms,) if isinstance(terms, str) else tuple(terms)
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown or not terms or len(set(terms)) != len(terms):
            problem = f"unknown term '{unknown[0]}'" if unknown else "expected distinct terms, at least one"
            raise ValueError(f"terms: {problem}, got {terms!r}. Allowed: {', '.join(LOSS_TERMS)}")
        self.terms = terms
        self.batch_dice, self.smooth, self.focal_alpha, self.focal_gamma = batch_dice, smooth, focal_alpha, focal_gamma
        self.sigmas = nn.ParameterDict({t: nn.Parameter(torch.ones(())) for t in terms}) if weighted else None

    def term_losses(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The unweighted L_k, each >= 0 (for logging, and for `combine`)."""
        _check_inputs(logits, labels)
        losses = {}
        for term in self.terms:
            if term == "dice":
                losses[term] = _dice(logits, labels, self.smooth, self.batch_dice)
            elif term == "ce":
                losses[term] = F.cross_entropy(_wide(logits), labels.long())
            else:
                losses[term] = _focal(logits, labels, self.focal_alpha, self.focal_gamma, self.smooth)
        return losses

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The weighted total of term values from `term_losses` (or a weighted average of them: it is affine in L_k)."""
        if self.sigmas is None:
            return sum(losses[t] for t in self.terms)
        return sum(losses[t] / (2 * self.sigmas[t] ** 2) + torch.log1p(self.sigmas[t] ** 2) for t in self.terms)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.combine(self.term_losses(logits, labels))

    def sigma_values(self) -> dict[str, float]:
        """The current s_k, for logging (empty when unweighted)."""
        return {} if self.sigmas is None else {t: s.detach().item() for t, s in self.sigmas.items()}


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """nnU-Net's weights for outputs at full, 1/2, 1/4 ... resolution: 1/2^i, the last set to 0 when there is more
    than one output (nnU-Net does not train the coarsest), normalised to sum 1."""
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs: expected an integer >= 1, got {num_outputs!r}")
    weights = [0.5**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return tuple(w / total for w in weights)


class DeepSupervisionLoss(nn.Module):
    """`loss` on each output of a deep-supervised network (full resolution first), weighted by
    `deep_supervision_weights`. The labels are given once at full resolution and downsampled by nearest
    neighbour to each output's size (nnU-Net downsamples them in its data pipeline). Since the weights sum
    to 1 and the uncertainty loss is affine in its terms, this is the loss of the weighted term average."""

    def __init__(self, loss: UncertaintyLoss, num_outputs: int) -> None:
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(num_outputs)

    def term_losses(self, outputs: Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The deep-supervision-weighted average of each term over the outputs (outputs with weight 0 skipped)."""
        if isinstance(outputs, Tensor) or len(outputs) != len(self.weights):
            got = "a tensor" if isinstance(outputs, Tensor) else f"{len(outputs)} outputs"
            raise ValueError(f"outputs: expected a list of {len(self.weights)} outputs, got {got}")
        totals: dict[str, Tensor] = {}
        for weight, logits in zip(self.weights, outputs):
            if weight == 0:
                continue
            scaled = labels
            if labels.shape[1:] != logits.shape[2:]:
                scaled = F.interpolate(labels[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
            for term, value in self.loss.term_losses(logits, scaled).items():
                totals[term] = totals.get(term, 0) + weight * value
        return totals

    def forward(self, outputs: Sequence[Tensor], labels: Tensor) -> Tensor:
        return self.loss.combine(self.term_losses(outputs, labels))
