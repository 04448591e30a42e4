"""The embedded data set: scikit-learn's 1,797 8x8 handwritten digits, shipped with the library
(no download), as float tensors in [0, 1] with a fixed stratified train/test split."""

from __future__ import annotations

import torch
from torch import Tensor


def digits_tensors() -> tuple[Tensor, Tensor]:
    """All images (N, 1, 8, 8) scaled to [0, 1] and labels (N,)."""
    from sklearn.datasets import load_digits  # here: scikit-learn takes a second to import

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def digits_split(test_size: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test), stratified; the same for the same seed everywhere."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size: expected a fraction in (0, 1), got {test_size}")
    from sklearn.model_selection import train_test_split

    x, y = digits_tensors()
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
