"""shared.stats: mean_std and the paired comparison across seeds, against a float64 hand computation
and scipy.stats.ttest_rel; n = 1 and n = 2 edge cases; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shared.stats import mean_std, paired_difference

# Student t quantiles t_{0.975, df} from a printed table (df = 1, 2, 4, 9), independent of scipy.
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


def test_mean_std_is_the_sample_std() -> None:
    values = [0.1, 0.4, 0.35, 0.8]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert mean_std(values) == pytest.approx((mean, std), rel=1e-12)
    assert mean_std([0.4]) == (0.4, None)
    with pytest.raises(ValueError, match="values: expected at least one value"):
        mean_std([])


def test_unlearn_uses_the_shared_mean_std() -> None:
    import unlearn.relearn

    assert unlearn.relearn.mean_std is mean_std


def test_against_a_float64_hand_computation() -> None:
    a = [0.81, 0.79, 0.84, 0.80, 0.83]
    b = [0.78, 0.80, 0.79, 0.76, 0.80]
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    sem = std / math.sqrt(n)
    out = paired_difference(a, b)
    assert out["n"] == 5 and out["df"] == 4 and out["confidence"] == 0.95
    assert out["mean"] == pytest.approx(mean, rel=1e-12)
    assert out["std"] == pytest.approx(std, rel=1e-12)
    assert out["sem"] == pytest.approx(sem, rel=1e-12)
    assert out["t_crit"] == pytest.approx(T975[4], abs=1e-3)
    assert out["ci_low"] == pytest.approx(mean - out["t_crit"] * sem, rel=1e-12)
    assert out["ci_high"] == pytest.approx(mean + out["t_crit"] * sem, rel=1e-12)
    assert out["ci_low"] == pytest.approx(mean - T975[4] * sem, abs=1e-5)
    assert out["t"] == pytest.approx(mean / sem, rel=1e-12)
    assert (out["mean_a"], out["std_a"]) == pytest.approx(mean_std(a), rel=1e-12)
    assert (out["mean_b"], out["std_b"]) == pytest.approx(mean_std(b), rel=1e-12)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_interval_uses_the_student_t_quantile(confidence: float) -> None:
    out = paired_difference([1.0, 2.0, 4.0, 3.5], [0.5, 2.5, 3.0, 2.0], confidence=confidence)
    half = stats.t.ppf((1 + confidence) / 2, 3) * out["sem"]
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((out["mean"] - half, out["mean"] + half), rel=1e-12)


@pytest.mark.parametrize("trial", range(40))
def test_consistent_with_ttest_rel(trial: int) -> None:
    rng = np.random.default_rng(trial)
    n = int(rng.integers(2, 12))
    a = rng.normal(0.7, 0.05, n)
    b = a - rng.normal(rng.choice([0.0, 0.02, 0.05]), 0.03, n)
    out = paired_difference(a.tolist(), b.tolist())
    ref = stats.ttest_rel(a, b)
    assert out["t"] == pytest.approx(float(ref.statistic), rel=1e-9)
    assert out["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)
    excludes_zero = out["ci_low"] > 0 or out["ci_high"] < 0
    assert excludes_zero == (float(ref.pvalue) < 0.05)


def test_n_equals_2_has_one_degree_of_freedom() -> None:
    out = paired_difference([0.9, 0.7], [0.8, 0.8])  # differences 0.1, -0.1
    assert out["n"] == 2 and out["df"] == 1
    assert out["mean"] == pytest.approx(0.0, abs=1e-15)
    assert out["std"] == pytest.approx(math.sqrt(0.02), rel=1e-9)
    assert out["sem"] == pytest.approx(0.1, rel=1e-9)
    assert out["t_crit"] == pytest.approx(T975[1], abs=1e-3)
    assert out["ci_low"] == pytest.approx(-T975[1] * 0.1, abs=1e-4)
    assert out["ci_high"] == pytest.approx(T975[1] * 0.1, abs=1e-4)


def test_n_equals_1_gives_the_difference_without_an_interval() -> None:
    out = paired_difference([0.9], [0.7])
    assert out["n"] == 1 and out["mean"] == pytest.approx(0.2)
    assert all(out[k] is None for k in ("std", "sem", "t_crit", "ci_low", "ci_high", "t", "p_value", "std_a", "std_b"))


def test_equal_differences_give_a_point_interval() -> None:
    out = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert out["std"] == 0.0 and out["ci_low"] == out["ci_high"] == out["mean"] == 0.5
    assert out["t"] is None and out["p_value"] is None


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"a, b: expected paired values of equal length .* got 3 and 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="a, b: expected at least one pair"):
        paired_difference([], [])
    with pytest.raises(ValueError, match=r"confidence: expected a number in \(0, 1\), got 95"):
        paired_difference([1, 2], [1, 3], confidence=95)
    with pytest.raises(ValueError, match=r"confidence: .* got 1.0"):
        paired_difference([1, 2], [1, 3], confidence=1.0)
    with pytest.raises(ValueError, match="a: expected finite numbers"):
        paired_difference([1, float("nan")], [1, 3])
    with pytest.raises(ValueError, match="b: expected a flat sequence"):
        paired_difference([1, 2], [[1], [3]])
