"""Train-time augmentations of image batches. Torch only, so a Flower ClientApp that reads its
partition from a file (fedsam.partitions) augments without importing `datasets`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Augment = Callable[[Tensor, torch.Generator], Tensor]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int, fill: tuple[float, ...]) -> Tensor:
    """Random crop with `padding` and horizontal flip of a batch (B, C, H, W), as torchvision's
    RandomCrop(H, padding) + RandomHorizontalFlip on each image (there is no CPU torchvision
    wheel); the padding takes `fill`, the normalised value of a black pixel. The draws come from
    the CPU `generator`, so a seeded run repeats on any device."""
    b, c, h, w = x.shape
    padded = (
        torch.tensor(fill, dtype=x.dtype, device=x.device)
        .view(1, c, 1, 1)
        .repeat(b, 1, h + 2 * padding, w + 2 * padding)
    )
    padded[:, :, padding : padding + h, padding : padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = top[:, None] + torch.arange(h, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
