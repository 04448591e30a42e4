"""The figures of an unlearning run (matplotlib PNG, written atomically): the metrics before
unlearning, after it and after the relearning attack, as bars per method; the relearning curves,
forget metrics against relearning steps, mean +- std per method; and the smoothed - plain paired
differences with their intervals, per attack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.report import save_figure

Stat = Mapping[str, float | None]  # {"mean", "std" (None for one value)}
#: how a reference model is drawn across the bars and curves
REFERENCE_STYLE = {"target": {"color": "black", "linestyle": "--"}, "retrain": {"color": "tab:green", "linestyle": ":"}}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _references(ax: Any, references: Mapping[str, Mapping[str, float]], metric: str) -> None:
    for name, values in references.items():
        if metric in values:
            ax.axhline(values[metric], label=name, linewidth=1.2, **REFERENCE_STYLE.get(name, {"color": "gray"}))


def stage_bars(
    path: Path,
    methods: Mapping[str, Mapping[str, Mapping[str, Stat]]],
    references: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    title: str,
) -> None:
    """One panel per metric: per method, a bar after unlearning and one after relearning (mean, std
    as error bar); the models before unlearning ("target") and the retrained one as lines.
    `methods[label][stage][metric]` with stage "unlearned" or "relearned"."""
    plt = _pyplot()
    rows, cols = _grid(len(metrics))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, constrained_layout=True)
    labels = list(methods)
    stages = (("unlearned", "tab:blue", "after unlearning"), ("relearned", "tab:red", "after relearning"))
    for ax, metric in zip(axes.flat, metrics):
        shown = [stage for stage in stages if any(metric in methods[label].get(stage[0], {}) for label in labels)]
        width = 0.8 / len(shown)
        for j, (stage, color, name) in enumerate(shown):
            stats = [methods[label].get(stage, {}).get(metric) for label in labels]
            xs = [i + (j - (len(shown) - 1) / 2) * width for i, st in enumerate(stats) if st is not None]
            errs = [st["std"] for st in stats if st is not None]
            yerr = None if all(e is None for e in errs) else [e or 0.0 for e in errs]
            ax.bar(xs, [st["mean"] for st in stats if st is not None], width, yerr=yerr, capsize=3, color=color,
                   label=name)
        _references(ax, references, metric)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0,
                      ha="right" if len(labels) > 3 else "center")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    _legend(fig, axes.flat[0])
    fig.suptitle(title)
    save_figure(fig, path)


def _legend(fig: Any, ax: Any) -> None:
    """One legend for the figure, below the panels (it would hide bars inside one)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8), fontsize="small")


def relearn_curves(
    path: Path,
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    references: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    title: str,
) -> None:
    """One panel per metric: mean over draws (and seeds) against relearning steps, +- std shaded, one
    line per method; the target and retrained models as horizontal lines. `curves[label]` are the rows
    of `unlearn.relearn.curve_stats`."""
    import matplotlib

    plt = _pyplot()
    rows, cols = _grid(len(metrics))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, constrained_layout=True)
    colors = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    for ax, metric in zip(axes.flat, metrics):
        for i, (label, rows_) in enumerate(curves.items()):
            steps = [r["step"] for r in rows_]
            means = [r[metric] for r in rows_]
            ax.plot(steps, means, marker="o", markersize=3, color=colors(i % colors.N), label=label)
            stds = [r.get(f"{metric}_std") for r in rows_]
            if all(s is not None for s in stds):
                ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color=colors(i % colors.N), alpha=0.15)
        _references(ax, references, metric)
        ax.set(xlabel="relearning step", title=metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    _legend(fig, axes.flat[0])
    fig.suptitle(title)
    save_figure(fig, path)


def paired_forest(path: Path, rows: Sequence[Mapping[str, Any]], metric: str, summary: str, title: str) -> None:
    """One panel per attack: each smoothed - plain difference of `summary` on `metric` (rows of
    `unlearn.summaries.paired_summaries` with an "attack" key) as its mean and 95 % interval, with 0 marked:
    left of it, less came back with the smoother."""
    plt = _pyplot()
    mine = [r for r in rows if r["metric"] == metric and r["summary"] == summary]
    attacks = list(dict.fromkeys(r["attack"] for r in mine))
    comparisons = list(dict.fromkeys(f"{r['method']} - {r['baseline']}" for r in mine))
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks) + 1.6, 0.32 * len(comparisons) + 1.4),
                             squeeze=False, sharey=True, constrained_layout=True)
    for ax, attack in zip(axes.flat, attacks):
        for r in (r for r in mine if r["attack"] == attack):
            y = comparisons.index(f"{r['method']} - {r['baseline']}")
            low, high = r["ci_low"], r["ci_high"]
            if low is not None:
                ax.plot([low, high], [y, y], color="tab:blue", linewidth=1.5)
            ax.plot([r["mean"]], [y], "o", color="tab:blue", markersize=4)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set(title=attack, xlabel=f"{summary} of {metric}: difference", yticks=range(len(comparisons)),
               yticklabels=comparisons, ylim=(len(comparisons) - 0.5, -0.5))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
