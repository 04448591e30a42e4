"""Per-class Dice and HD95 of label maps (batch, *spatial), background excluded, computed by MONAI (the field's
reference implementation) on one-hot tensors, with its empty-structure cases made explicit:

- a class absent from both truth and prediction has no Dice: `empty_dice` (NaN by default) is reported, and NaN
  is left out of every mean, so that slices without a structure (apical slices lack the RV) neither reward nor
  penalise a model. Other conventions exist: UU-Mamba's evaluation/ACDC_DSC_Eval.py scores it 1 (per 3D volume,
  where it is rare), medpy's `dc` (the ACDC challenge's script) 0; pass `empty_dice=1.0` or `0.0` to follow them;
- a class present in only one of them has Dice 0. MONAI's default `ignore_empty=True` gives NaN whenever the
  truth is empty, which would hide false positives, so Dice is computed with `ignore_empty=False`;
- HD95 is undefined (MONAI: NaN) when one side is empty: it is reported NaN, left out of the mean, and counted
  (`hd95_undefined_<c>`) so that a model missing structures cannot look good on HD95 alone. When both sides are
  empty HD95 is NaN and not counted: there is nothing to miss.

MONAI is imported inside the functions: importing it takes seconds, and `import seg.metrics` should not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.validate import check_int

__all__ = ["dice_per_class", "dice_reference", "hd95_per_class", "one_hot", "segmentation_metrics"]

LabelMap = np.ndarray | Tensor
Spacing = float | Sequence[float] | Sequence[Sequence[float]] | np.ndarray


def _labels(name: str, labels: LabelMap, num_classes: int) -> Tensor:
    """`labels` as an int64 CPU tensor (batch, *spatial) (MONAI's distances run on the CPU), checked to hold class
    indices 0..num_classes-1."""
    # a copy when numpy's strides are negative (flipped views), which torch cannot wrap
    tensor = labels.cpu() if isinstance(labels, Tensor) else torch.as_tensor(np.ascontiguousarray(labels))
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer label map, got {tensor.dtype}")
    if tensor.dim() < 2:
        raise ValueError(f"{name}: expected (batch, *spatial), got shape {tuple(tensor.shape)}")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        bad = int(tensor.min()) if int(tensor.min()) < 0 else int(tensor.max())
        raise ValueError(f"{name}: value {bad} outside the classes 0..{num_classes - 1}")
    return tensor.long()


def _pair(pred_labels: LabelMap, true_labels: LabelMap, num_classes: int) -> tuple[Tensor, Tensor]:
    check_int("num_classes", num_classes, 2)
    pred, true = _labels("pred_labels", pred_labels, num_classes), _labels("true_labels", true_labels, num_classes)
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels {tuple(pred.shape)} and true_labels {tuple(true.shape)}: expected the same shape")
    if len(pred) == 0:
        raise ValueError("pred_labels: expected at least one image, got an empty batch")
    return pred, true


def one_hot(labels: LabelMap, num_classes: int) -> Tensor:
    """Label maps (batch, *spatial) as float one-hot (batch, num_classes, *spatial), the layout MONAI's metrics take."""
    check_int("num_classes", num_classes, 2)
    return F.one_hot(_labels("labels", labels, num_classes), num_classes).movedim(-1, 1).float()


def _present(labels: Tensor, num_classes: int) -> np.ndarray:
    """(batch, num_classes - 1): whether foreground class c occurs in each map."""
    flat = labels.reshape(len(labels), -1)
    return torch.stack([(flat == c).any(1) for c in range(1, num_classes)], dim=1).numpy()


def dice_per_class(pred_labels: LabelMap, true_labels: LabelMap, num_classes: int, *,
                   empty_dice: float = math.nan) -> np.ndarray:
    """MONAI's Dice per image and foreground class, float64 (batch, num_classes - 1); `empty_dice` where the class
    is absent from both (module docstring)."""
    from monai.metrics import compute_dice

    pred, true = _pair(pred_labels, true_labels, num_classes)
    dice = compute_dice(one_hot(pred, num_classes), one_hot(true, num_classes), include_background=False,
                        ignore_empty=False).double().numpy()
    dice[~(_present(pred, num_classes) | _present(true, num_classes))] = empty_dice
    return dice


def dice_reference(pred_labels: LabelMap, true_labels: LabelMap, num_classes: int, *,
                   empty_dice: float = math.nan) -> np.ndarray:
    """2 |P ∩ T| / (|P| + |T|) per image and foreground class in plain numpy, `empty_dice` when |P| + |T| = 0: the
    formula MONAI's Dice is tested against, and a MONAI-free Dice for the overlays."""
    pred, true = (t.numpy() for t in _pair(pred_labels, true_labels, num_classes))
    pred, true = pred.reshape(len(pred), -1), true.reshape(len(true), -1)
    dice = np.full((len(pred), num_classes - 1), empty_dice, dtype=np.float64)
    for c in range(1, num_classes):
        p, t = pred == c, true == c
        total = p.sum(1) + t.sum(1)
        dice[total > 0, c - 1] = 2 * (p & t).sum(1)[total > 0] / total[total > 0]
    return dice


def _spacing(spacing: Spacing | None, batch: int, dims: int) -> float | list[tuple[float, ...]] | None:
    """`spacing` in MONAI's per-image form: None (1 per pixel), one float, one (dims,) or one per image (batch, dims)."""
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        per_image = np.full((batch, dims), float(values))
    elif values.shape == (dims,):
        per_image = np.broadcast_to(values, (batch, dims))
    elif values.shape == (batch, dims):
        per_image = values
    else:
        raise ValueError(f"spacing: expected a float, ({dims},) or ({batch}, {dims}) pixel sizes, got shape "
                         f"{values.shape}")
    if not (np.isfinite(per_image).all() and (per_image > 0).all()):
        raise ValueError(f"spacing: expected finite pixel sizes > 0, got {spacing!r}")
    return [tuple(float(s) for s in row) for row in per_image]


def hd95_per_class(pred_labels: LabelMap, true_labels: LabelMap, num_classes: int,
                   spacing: Spacing | None = None) -> np.ndarray:
    """MONAI's symmetric 95th-percentile Hausdorff distance per image and foreground class, float64
    (batch, num_classes - 1), in the units of `spacing` (pixels when None; mm with ACDC's pixel sizes). NaN where
    the class is absent from the truth or the prediction (module docstring)."""
    from monai.metrics import compute_hausdorff_distance

    pred, true = _pair(pred_labels, true_labels, num_classes)
    per_image = _spacing(spacing, len(pred), pred.dim() - 1)
    with warnings.catch_warnings():
        # empty masks are handled by the caller's NaN; the deprecation is inside MONAI, no caller can act on it
        warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class .* is all 0")
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*")
        hd95 = compute_hausdorff_distance(one_hot(pred, num_classes), one_hot(true, num_classes),
                                          include_background=False, percentile=95, spacing=per_image)
    hd95 = hd95.double().numpy()
    hd95[~np.isfinite(hd95)] = math.nan
    return hd95


def _nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN values, NaN when there are none (numpy's nanmean warns then)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def segmentation_metrics(pred_labels: LabelMap, true_labels: LabelMap, num_classes: int,
                         spacing: Spacing | None = None, *, empty_dice: float = math.nan) -> dict[str, float]:
    """Per-class Dice and HD95 averaged over the images (NaN left out), flat keys ready for a metrics log:
    `dice_<c>`, `hd95_<c>`, `hd95_undefined_<c>` (images where exactly one side has class c) for c = 1 ..
    num_classes - 1, `dice_mean` and `hd95_mean` (the mean of the per-class means, as ACDC_DSC_Eval.py), `images`."""
    pred, true = _pair(pred_labels, true_labels, num_classes)
    dice = dice_per_class(pred, true, num_classes, empty_dice=empty_dice)
    hd95 = hd95_per_class(pred, true, num_classes, spacing)
    undefined = _present(pred, num_classes) ^ _present(true, num_classes)
    metrics: dict[str, float] = {}
    for c in range(1, num_classes):
        metrics[f"dice_{c}"] = _nanmean(dice[:, c - 1])
        metrics[f"hd95_{c}"] = _nanmean(hd95[:, c - 1])
        metrics[f"hd95_undefined_{c}"] = int(undefined[:, c - 1].sum())
    metrics["dice_mean"] = _nanmean(np.array([metrics[f"dice_{c}"] for c in range(1, num_classes)]))
    metrics["hd95_mean"] = _nanmean(np.array([metrics[f"hd95_{c}"] for c in range(1, num_classes)]))
    metrics["images"] = len(pred)
    return metrics
