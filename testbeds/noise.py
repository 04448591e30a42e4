"""Label noise for any classification training split: the setting in which SAM's robustness to
memorising wrong labels is measured (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", Sec. 3.3; Baek et al., ICLR 2024, "Why is SAM Robust to Label
Noise?").

Exactly round(rate * N) examples, chosen by a seeded permutation, get a wrong label, so the flipped
fraction is exact rather than expected:
- "symmetric": a label drawn uniformly from the other C - 1 classes;
- "asymmetric": the paired class c -> (c + 1) mod C, the "pair flip" of Han et al. (NeurIPS 2018,
  Co-teaching) and the circular next-class flip used for CIFAR-100 (not the hand-made CIFAR-10 map
  truck->automobile, bird->airplane, deer->horse, cat<->dog of Patrini et al. 2017).
The draws come from a torch.Generator seeded with `derive_seed(seed, "label-noise")`, never from
the global generators. Test splits are never touched.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from shared.seeding import derive_seed
from testbeds.sources import ImageSource, label_column

NoiseKind = Literal["symmetric", "asymmetric"]
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)


def check_noise(rate: float, kind: str) -> None:
    """rate in [0, 1) and a known kind, else a ValueError naming the field."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"label_noise: expected a rate in [0, 1), got {rate!r}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"label_noise_kind: unknown kind {kind!r}. Allowed: {', '.join(NOISE_KINDS)}")


def noisy_labels(labels: Tensor, rate: float, kind: NoiseKind, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """(noisy labels, flipped mask) of integer `labels` (N,) in [0, num_classes): exactly
    round(rate * N) of them changed as `kind` says; the same for the same seed."""
    check_noise(rate, kind)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2 (a wrong label needs another class), got {num_classes!r}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    generator = torch.Generator().manual_seed(derive_seed(seed, "label-noise"))
    n_flip = round(rate * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:n_flip]
    if kind == "symmetric":  # an offset in 1..C-1: uniform over the other classes
        offset = torch.randint(1, num_classes, (n_flip,), generator=generator)
    else:
        offset = torch.ones(n_flip, dtype=torch.int64)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offset) % num_classes
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def with_label_noise(source: ImageSource, rate: float, kind: NoiseKind, seed: int) -> tuple[ImageSource, float]:
    """`source` with `noisy_labels` in its train split (images, the test split and the label feature
    unchanged), and the fraction of training labels flipped."""
    check_noise(rate, kind)
    feature = source.train.features["label"]
    labels = torch.from_numpy(label_column(source.train))
    noisy, flipped = noisy_labels(labels, rate, kind, feature.num_classes, seed)
    train = source.train.remove_columns("label").add_column("label", np.asarray(noisy), feature=feature)
    fraction = int(flipped.sum()) / len(flipped) if len(flipped) else 0.0  # exact, not a float32 mean
    return dataclasses.replace(source, train=train), fraction
