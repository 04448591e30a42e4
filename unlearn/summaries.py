"""What a relearning attack brought back, as numbers that compare methods (issue 17):

- `curve_auc`: the area under a metric's relearning curve divided by the steps it spans (trapezoid
  rule), i.e. the metric's mean level over the attack: a method that holds out for most of the attack
  scores lower than one that gives way at once, even where both end at the same value.
- `recovery_ratio`: (after - unlearned) / (target - unlearned): 0 when nothing came back, 1 when the
  attack restored the target model's value; undefined (None) when the unlearning removed nothing.
- `paired_summaries`: per smoothed method, the difference smoothed minus plain (the same objective
  without a smoother) of each summary, paired over (seed, draw): both methods start from the same
  target, are attacked with the same samples, and the pairing removes what seeds and draws share.
  Mean and 95 % Student-t interval (`shared.stats.paired_difference`). The draws of one seed attack the
  same unlearned model, so they are not independent: `seed_means` averages them first, and the pairs
  over seeds give the honest (wider) interval.

For a forget metric (higher = more remembered), lower AUC and lower recovery mean more resilient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.stats import mean_std, paired_difference

SUMMARIES = ("auc", "recovery", "final")


def curve_auc(curve: Sequence[Mapping[str, Any]], metric: str) -> float:
    """Trapezoid area under `metric` over the curve's steps / the steps spanned (one point: its value)."""
    if not curve:
        raise ValueError("curve: expected at least one evaluation point")
    steps = np.array([row["step"] for row in curve], dtype=np.float64)
    values = np.array([row[metric] for row in curve], dtype=np.float64)
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"curve: steps must increase, got {steps.tolist()}")
    if len(curve) == 1:
        return float(values[0])
    area = float(np.sum((values[1:] + values[:-1]) / 2.0 * np.diff(steps)))
    return area / float(steps[-1] - steps[0])


def recovery_ratio(after: float, unlearned: float, target: float) -> float | None:
    """(after - unlearned) / (target - unlearned); None where target == unlearned (nothing was removed)."""
    gap = target - unlearned
    return None if gap == 0 else (after - unlearned) / gap


def draw_summaries(curve: Sequence[Mapping[str, Any]], unlearned: Mapping[str, float], target: Mapping[str, float],
                   metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """One attack draw: {summary: {metric: value}} for the AUC, the recovery ratio of the last point and
    the last point itself."""
    last = curve[-1]
    return {
        "auc": {m: curve_auc(curve, m) for m in metrics},
        "recovery": {m: recovery_ratio(last[m], unlearned[m], target[m]) for m in metrics},
        "final": {m: float(last[m]) for m in metrics},
    }


def unit_summaries(units: Sequence[Mapping[str, Any]], target: Mapping[str, float], metrics: Sequence[str]
                   ) -> dict[tuple[str, int, int], dict[str, dict[str, float | None]]]:
    """{(method, seed, draw): draw_summaries} over the pipeline's units (each with its draws' curves)."""
    out = {}
    for unit in units:
        for draw in unit["draws"]:
            out[unit["method"], unit["seed"], draw["draw"]] = draw_summaries(draw["curve"], unit["unlearned"],
                                                                             target, metrics)
    return out


def method_summaries(summaries: Mapping[tuple[str, int, int], Mapping[str, Mapping[str, float | None]]],
                     metrics: Sequence[str]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Per method: {summary: {metric: {"mean", "std", "n"}}} over its seeds and draws (undefined recoveries left out)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for method in dict.fromkeys(key[0] for key in summaries):
        rows = [s for key, s in summaries.items() if key[0] == method]
        out[method] = {}
        for name in SUMMARIES:
            out[method][name] = {}
            for m in metrics:
                values = [r[name][m] for r in rows if r[name][m] is not None]
                mean, std = mean_std(values) if values else (None, None)
                out[method][name][m] = {"mean": mean, "std": std, "n": len(values)}
    return out


def seed_means(summaries: Mapping[tuple[str, int, int], Mapping[str, Mapping[str, float | None]]]
               ) -> dict[tuple[str, int], dict[str, dict[str, float | None]]]:
    """{(method, seed): each summary and metric averaged over the seed's draws (where defined; None where no
    draw has it)}: one value per unlearned model."""
    def mean(values: list[float | None]) -> float | None:
        defined = [v for v in values if v is not None]
        return float(np.mean(defined)) if defined else None

    out: dict[tuple[str, int], dict[str, dict[str, float | None]]] = {}
    for method, seed in dict.fromkeys(key[:2] for key in summaries):
        rows = [v for key, v in summaries.items() if key[:2] == (method, seed)]
        out[method, seed] = {name: {m: mean([r[name][m] for r in rows]) for m in rows[0][name]} for name in SUMMARIES}
    return out


def paired_summaries(summaries: Mapping[tuple[Any, ...], Mapping[str, Mapping[str, float | None]]],
                     pairs: Mapping[str, str], metrics: Sequence[str], confidence: float = 0.95
                     ) -> list[dict[str, Any]]:
    """For each (smoothed, plain) in `pairs`: the paired difference smoothed - plain of every summary and
    metric over the keys both have, (seed, draw) or (seed,) of `seed_means` (where both values are defined)."""
    rows = []
    for smoothed, plain in pairs.items():
        keys = sorted({k[1:] for k in summaries if k[0] == smoothed} & {k[1:] for k in summaries if k[0] == plain})
        for name in SUMMARIES:
            for m in metrics:
                both = [(summaries[(smoothed, *k)][name][m], summaries[(plain, *k)][name][m]) for k in keys]
                both = [(a, b) for a, b in both if a is not None and b is not None]
                if not both:
                    continue
                diff = paired_difference([a for a, _ in both], [b for _, b in both], confidence)
                rows.append({"method": smoothed, "baseline": plain, "summary": name, "metric": m, **diff})
    return rows
