"""The tables, plots and summary of a `samsuite seg run`, from its metrics.jsonl alone (so a resumed or
finished run can be reported again): `results.csv/.md` (per arm and test domain, mean ± std over
seeds), `pairs.csv/.md` (the reference arm minus each other arm, paired over seeds, 95% intervals),
`curves.png` (validation Dice and training loss per epoch) and `summary.json`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.report import save_panels, write_table
from shared.runio import RunDir, environment
from shared.stats import mean_std, paired_difference

if TYPE_CHECKING:
    from seg.train import SegConfig, Split

SHORT = {1: "RV", 2: "MYO", 3: "LV"}  # ACDC's foreground classes, as the papers' tables name them
#: (column, key of a test record): Dice per class and its foreground mean, then HD95 (pixels, or mm on ACDC)
COLUMNS = ([(f"Dice {name}", f"dice_{c}") for c, name in SHORT.items()] + [("Dice mean", "dice_mean")]
           + [(f"HD95 {name}", f"hd95_{c}") for c, name in SHORT.items()] + [("HD95 mean", "hd95_mean")])


def _fmt(values: Sequence[float]) -> str:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return "n/a"
    mean, std = mean_std(finite)
    missing = len(values) - len(finite)
    return (f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}") + (f" ({missing} n/a)" if missing else "")


def results_rows(tests: list[dict[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (test domain, arm): each metric's mean ± std over seeds, the slices where HD95 is undefined
    (a class on one side only, summed over seeds and classes), the selected epochs, the step time."""
    rows = []
    for domain in dict.fromkeys(r["domain"] for r in tests):
        for arm in arms:
            mine = [r for r in tests if r["arm"] == arm and r["domain"] == domain]
            if not mine:
                continue
            row: dict[str, Any] = {"domain": domain, "arm": arm, "seeds": len(mine)}
            row.update({column: _fmt([r[key] for r in mine]) for column, key in COLUMNS})
            row["HD95 undefined"] = sum(int(r[f"hd95_undefined_{c}"]) for r in mine for c in SHORT)
            row["best epochs"] = ",".join(str(r["best_epoch"]) for r in mine)
            row["s/step"] = f"{np.median([r['step_s'] for r in mine]):.3f}"
            rows.append(row)
    return rows


def pair_rows(tests: list[dict[str, Any]], arms: Sequence[str], reference: str) -> list[dict[str, Any]]:
    """The reference arm minus each other arm on each test domain's foreground Dice and HD95, paired by
    seed: mean difference, 95% interval, p-value."""
    rows = []
    for domain in dict.fromkeys(r["domain"] for r in tests):
        ref = {r["seed"]: r for r in tests if r["arm"] == reference and r["domain"] == domain}
        for arm in arms:
            if arm == reference:
                continue
            other = {r["seed"]: r for r in tests if r["arm"] == arm and r["domain"] == domain}
            seeds = sorted(set(ref) & set(other))
            for key in ("dice_mean", "hd95_mean"):
                pairs = [(ref[s][key], other[s][key]) for s in seeds
                         if ref[s].get(key) is not None and other[s].get(key) is not None
                         and np.isfinite(ref[s][key]) and np.isfinite(other[s][key])]
                if not pairs:
                    continue
                d = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
                rows.append({"domain": domain, "metric": key, "comparison": f"{reference} - {arm}", "seeds": d["n"],
                             "difference": round(d["mean"], 4),
                             "ci95": None if d["ci_low"] is None else f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]",
                             "p": None if d["p_value"] is None else round(d["p_value"], 4)})
    return rows


def plot_curves(path: Path, epochs: list[dict[str, Any]], title: str) -> None:
    """Validation foreground Dice and training loss per epoch, one line per arm (mean over seeds, band = range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (dice_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for arm in dict.fromkeys(r["arm"] for r in epochs):
        for ax, key in ((dice_ax, "val_dice_mean"), (loss_ax, "train_loss")):
            by_epoch: dict[int, list[float]] = {}
            for r in epochs:
                if r["arm"] == arm:
                    by_epoch.setdefault(r["epoch"], []).append(r[key])
            xs = sorted(by_epoch)
            ys = np.array([np.mean(by_epoch[x]) for x in xs])
            line = ax.plot(xs, ys, label=arm)[0]
            ax.fill_between(xs, [min(by_epoch[x]) for x in xs], [max(by_epoch[x]) for x in xs],
                            color=line.get_color(), alpha=0.2)
    dice_ax.set(xlabel="epoch", ylabel="foreground Dice", title="Validation Dice")
    loss_ax.set(xlabel="epoch", ylabel="training loss at w", yscale="log", title="Training loss")
    save_panels(fig, (dice_ax, loss_ax), title, path)


def finish(run: RunDir, cfg: SegConfig, config: dict[str, Any], splits: dict[str, Split], wall_s: float
           ) -> dict[str, Any]:
    """Write the tables, the plot and summary.json of a finished run; returns the summary."""
    records = run.metrics()
    tests = [r for r in records if r["kind"] == "test"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    title = f"{cfg.data} segmentation, {len(cfg.seeds)} seed(s), {cfg.epochs} epochs"
    results = results_rows(tests, cfg.arms)
    write_table(run.path / "results", results, title=f"{title}: test metrics, mean ± std over seeds "
                "(model selected on validation Dice)")
    pairs = pair_rows(tests, cfg.arms, cfg.reference) if cfg.reference and len(cfg.arms) > 1 else []
    if pairs:
        write_table(run.path / "pairs", pairs, title=f"{title}: paired differences over seeds (95% t interval)")
    plot_curves(run.path / "curves.png", epochs, title)
    summary = {"results": results, "pairs": pairs, "config": config,
               "split_sizes": {key: len(labels) for key, (_, labels) in splits.items()},
               "wall_s": wall_s, "environment": environment(str(cfg.torch_device))}
    run.write_json("summary.json", summary)
    return summary
