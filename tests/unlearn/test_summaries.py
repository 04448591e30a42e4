"""The relearning summaries against values computed by hand: the normalized area under a curve, the
recovery ratio, and the paired difference smoothed - plain over (seed, draw) and over seeds (draws averaged)
with its t interval."""

from __future__ import annotations

import math

import pytest

from unlearn.summaries import (
    curve_auc,
    draw_summaries,
    method_summaries,
    paired_summaries,
    recovery_ratio,
    seed_means,
    unit_summaries,
)


def curve(steps: list[int], values: list[float]) -> list[dict[str, float]]:
    return [{"step": s, "forget_acc": v} for s, v in zip(steps, values)]


def test_auc_is_the_trapezoid_area_over_the_steps() -> None:
    # (0.2 + 0.6) / 2 * 2 + (0.6 + 0.4) / 2 * 2 = 1.8, over 4 steps
    assert curve_auc(curve([0, 2, 4], [0.2, 0.6, 0.4]), "forget_acc") == pytest.approx(0.45)
    # uneven spacing: 0.5 * 1 + 1.0 * 3 = 3.5, over 4 steps (a curve that rises at once scores high)
    assert curve_auc(curve([0, 1, 4], [0.0, 1.0, 1.0]), "forget_acc") == pytest.approx(0.875)
    assert curve_auc(curve([0, 3, 4], [0.0, 0.0, 1.0]), "forget_acc") == pytest.approx(0.125)
    assert curve_auc(curve([5], [0.3]), "forget_acc") == 0.3
    with pytest.raises(ValueError, match="steps must increase"):
        curve_auc(curve([0, 2, 2], [0.1, 0.2, 0.3]), "forget_acc")


def test_recovery_ratio() -> None:
    assert recovery_ratio(0.5, 0.3, 0.8) == pytest.approx(0.4)  # 0.2 of the 0.5 removed came back
    assert recovery_ratio(0.3, 0.3, 0.8) == 0.0 and recovery_ratio(0.8, 0.3, 0.8) == pytest.approx(1.0)
    assert recovery_ratio(0.9, 0.3, 0.8) == pytest.approx(1.2)  # beyond the target
    assert recovery_ratio(0.5, 0.8, 0.8) is None  # nothing was removed: undefined, not 0 or infinity


def test_draw_summaries_use_the_last_point_for_recovery() -> None:
    got = draw_summaries(curve([0, 2, 4], [0.2, 0.6, 0.4]), {"forget_acc": 0.2}, {"forget_acc": 0.7}, ["forget_acc"])
    assert got == {"auc": {"forget_acc": pytest.approx(0.45)}, "recovery": {"forget_acc": pytest.approx(0.4)},
                   "final": {"forget_acc": 0.4}}


def units(method: str, finals: list[list[float]]) -> list[dict]:
    """One unit per seed, one draw per value: each draw's curve goes from 0.2 at step 0 to its final at step 2."""
    return [{"method": method, "seed": seed, "unlearned": {"forget_acc": 0.2},
             "draws": [{"draw": d, "curve": curve([0, 2], [0.2, v])} for d, v in enumerate(draws)]}
            for seed, draws in enumerate(finals)]


def test_paired_difference_over_seeds_and_draws() -> None:
    target = {"forget_acc": 0.8}
    plain = units("npo", [[0.5, 0.6], [0.7, 0.8]])
    smoothed = units("npo+sam", [[0.4, 0.4], [0.4, 0.4]])  # differences -0.1, -0.2, -0.3, -0.4
    summaries = unit_summaries(plain + smoothed, target, ["forget_acc"])
    assert set(summaries) == {(m, s, d) for m in ("npo", "npo+sam") for s in (0, 1) for d in (0, 1)}
    rows = {r["summary"]: r for r in paired_summaries(summaries, {"npo+sam": "npo"}, ["forget_acc"])}
    final = rows["final"]
    assert (final["method"], final["baseline"], final["n"]) == ("npo+sam", "npo", 4)
    std = math.sqrt(((0.15**2 + 0.05**2) * 2) / 3)
    half = 3.182446305284263 * std / 2  # t_{0.975, 3} * std / sqrt(4)
    assert final["mean"] == pytest.approx(-0.25)
    assert (final["ci_low"], final["ci_high"]) == (pytest.approx(-0.25 - half), pytest.approx(-0.25 + half))
    # recovery: (final - 0.2) / 0.6, a linear map of the finals: the difference scales by 1 / 0.6
    assert rows["recovery"]["mean"] == pytest.approx(-0.25 / 0.6)
    # AUC of a two-point curve from 0.2: the mean of its ends, so half the finals' difference
    assert rows["auc"]["mean"] == pytest.approx(-0.125)
    per_method = method_summaries(summaries, ["forget_acc"])
    assert per_method["npo"]["final"]["forget_acc"]["mean"] == pytest.approx(0.65)
    assert per_method["npo+sam"]["final"]["forget_acc"] == {"mean": pytest.approx(0.4), "std": 0.0, "n": 4}


def test_pairs_over_seeds_average_each_seeds_draws_first() -> None:
    """The draws of a seed attack one unlearned model: over seeds, the differences are -0.15 and -0.35 (the
    means of -0.1, -0.2 and of -0.3, -0.4), 2 pairs, t_{0.975, 1} = 12.706."""
    summaries = unit_summaries(units("npo", [[0.5, 0.6], [0.7, 0.8]]) + units("npo+sam", [[0.4, 0.4], [0.4, 0.4]]),
                               {"forget_acc": 0.8}, ["forget_acc"])
    means = seed_means(summaries)
    assert set(means) == {(m, s) for m in ("npo", "npo+sam") for s in (0, 1)}
    assert means["npo", 1]["final"]["forget_acc"] == pytest.approx(0.75)
    final = next(r for r in paired_summaries(means, {"npo+sam": "npo"}, ["forget_acc"]) if r["summary"] == "final")
    half = 12.706204736174698 * math.sqrt(2 * 0.1**2) / math.sqrt(2)
    assert (final["n"], final["mean"]) == (2, pytest.approx(-0.25))
    assert (final["ci_low"], final["ci_high"]) == (pytest.approx(-0.25 - half), pytest.approx(-0.25 + half))
    undefined = seed_means(unit_summaries(units("npo", [[0.5, 0.6]]), {"forget_acc": 0.2}, ["forget_acc"]))
    assert undefined["npo", 0]["recovery"]["forget_acc"] is None


def test_undefined_recoveries_are_left_out_of_the_pairs() -> None:
    target = {"forget_acc": 0.2}  # the target equals the unlearned value: nothing was removed
    summaries = unit_summaries(units("npo", [[0.5]]) + units("npo+sam", [[0.4]]), target, ["forget_acc"])
    rows = paired_summaries(summaries, {"npo+sam": "npo"}, ["forget_acc"])
    assert [r["summary"] for r in rows] == ["auc", "final"]
    assert method_summaries(summaries, ["forget_acc"])["npo"]["recovery"]["forget_acc"] == {"mean": None, "std": None,
                                                                                            "n": 0}
