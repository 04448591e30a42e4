"""Statistics across seeds: mean and sample standard deviation, and paired comparisons of two
methods run on the same seeds (a paired t interval, which removes the seed-to-seed variance that
both methods share and is the comparison that a table of "mean ± std" columns cannot show)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _finite_array(values: Sequence[float], field: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{field}: expected a flat sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{field}: expected finite numbers, got {list(values)!r}")
    return array


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the deviation is None for a single value."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("values: expected at least one value")
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired comparison of a and b over the same n seeds (a[i] and b[i] from seed i): the differences
    d = a - b, their mean, sample std (ddof=1), standard error std / sqrt(n), and the two-sided
    Student-t interval mean ± t_{(1+confidence)/2, n-1} * sem (quantile from `scipy.stats.t.ppf`;
    scipy comes with scikit-learn), with the paired t statistic and its two-sided p-value, which
    agree with `scipy.stats.ttest_rel(a, b)`: the interval excludes 0 exactly when p < 1 - confidence.

    n = 1 gives the difference with no spread: std, sem, the interval, t and p are None (one seed
    cannot tell noise from effect, and returning a number there would invite reading it as one).
    Where all differences are equal (sem = 0) the interval is [mean, mean] and t, p are None.
    Keys: n, df, confidence, mean, std, sem, t_crit, ci_low, ci_high, t, p_value, mean_a, std_a, mean_b, std_b.
    """
    x, y = _finite_array(a, "a"), _finite_array(b, "b")
    if x.size != y.size:
        raise ValueError(f"a, b: expected paired values of equal length (one per seed), got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("a, b: expected at least one pair of values")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    d = x - y
    n = int(d.size)
    mean_a, std_a = mean_std(x)
    mean_b, std_b = mean_std(y)
    out: dict[str, Any] = {
        "n": n, "df": n - 1, "confidence": float(confidence), "mean": float(d.mean()), "std": None, "sem": None,
        "t_crit": None, "ci_low": None, "ci_high": None, "t": None, "p_value": None,
        "mean_a": mean_a, "std_a": std_a, "mean_b": mean_b, "std_b": std_b,
    }  # fmt: skip
    if n == 1:
        return out
    from scipy.stats import t as student_t  # here: scipy.stats costs a noticeable import time

    std = float(d.std(ddof=1))
    sem = std / math.sqrt(n)
    t_crit = float(student_t.ppf((1.0 + confidence) / 2.0, n - 1))
    out.update(std=std, sem=sem, t_crit=t_crit, ci_low=out["mean"] - t_crit * sem, ci_high=out["mean"] + t_crit * sem)
    if sem > 0.0:
        t_stat = out["mean"] / sem
        out.update(t=t_stat, p_value=float(2.0 * student_t.sf(abs(t_stat), n - 1)))
    return out
