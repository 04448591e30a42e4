"""Smoothers of the forget loss, one module each, registered by name in SMOOTHERS: none, sam (and
asam, gsam), rs (randomized smoothing), gp (gradient penalty), wa (weight averaging)."""

from unlearn.smoothers import gp, none, rs, sam, wa  # noqa: F401  (importing registers them)
from unlearn.smoothers.base import SMOOTHERS, Pair, Smoother, StepTerms, accumulate

__all__ = ["SMOOTHERS", "Pair", "Smoother", "StepTerms", "accumulate"]
