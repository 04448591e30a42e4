"""USEFUL, "UpSample Early For Uniform Learning" (Nguyen et al., NeurIPS 2024, "Changing the Training Data
Distribution to Reduce Simplicity Bias Improves In-distribution Generalization"): cluster every class's
training examples into two groups by an early model's outputs, upsample the group that is learned
more slowly, and retrain from scratch on that distribution.

The paper leaves open what exactly is clustered and when; our choices (SEED_METHODS.md 5):
- the output is the early model's logits (the network output, as the abstract says, not a hidden
  feature), in eval mode, over the whole training set;
- 2-means per class with scikit-learn's KMeans (k-means++, 10 restarts, seeded): a well-kept
  implementation rather than our own;
- the slow group is the cluster with the higher mean cross-entropy under the training labels;
  each of its examples appears `factor` times (default 2, the paper's);
- a class with fewer than two distinct outputs is left as it is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class UsefulPlan:
    """The new training distribution: `order` lists positions in the original training set, the
    slow cluster's `factor` times, the others once; `classes` records every class's clustering."""

    order: Tensor
    upsampled: Tensor  # bool (N,): the examples of the slow clusters
    factor: int
    classes: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        n = len(self.upsampled)
        return {"examples": n, "upsampled": int(self.upsampled.sum()), "upsampled_fraction": round(
            float(self.upsampled.float().mean()), 4), "new_size": len(self.order), "factor": self.factor,
            "classes": self.classes}


def useful_plan(logits: Tensor, labels: Tensor, num_classes: int, factor: int = 2, seed: int = 0) -> UsefulPlan:
    """Cluster each class's `logits` (N, C) into two groups and upsample the one with the higher mean
    cross-entropy against `labels` by `factor`."""
    from sklearn.cluster import KMeans

    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"useful_factor: expected an integer >= 2 (how many times a slow example appears), got {factor!r}")
    z = logits.detach().double().cpu()
    y = labels.cpu()
    losses = F.cross_entropy(z, y, reduction="none")
    upsampled = torch.zeros(len(y), dtype=torch.bool)
    classes = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        points = z[members].numpy()
        if len(members) < 2 or len(np.unique(points, axis=0)) < 2:
            classes.append({"class": c, "size": len(members), "slow": 0})
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # near-duplicate points: KMeans warns, the split is still valid
            assignment = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(points)
        assignment = torch.from_numpy(assignment)
        mean_loss = [float(losses[members[assignment == k]].mean()) for k in (0, 1)]
        slow = int(np.argmax(mean_loss))
        upsampled[members[assignment == slow]] = True
        classes.append({"class": c, "size": len(members), "slow": int((assignment == slow).sum()),
                        "slow_loss": round(mean_loss[slow], 4), "fast_loss": round(mean_loss[1 - slow], 4)})
    extra = torch.nonzero(upsampled).flatten().repeat(factor - 1)
    return UsefulPlan(torch.cat([torch.arange(len(y)), extra]), upsampled, factor, classes)
