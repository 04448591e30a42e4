"""The results of a `samsuite train` run, from its metrics.jsonl: for every unit (held-out domain x seed)
and optimizer, the test accuracy at the epoch with the best validation accuracy (model selection on
validation data, DomainBed's training-domain validation in leave-one-domain-out) and at the last epoch;
per optimizer, the mean ± std over seeds and the paired difference to the base optimizer (same seed,
same data, same initial weights) with its 95% confidence interval."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.report import learning_curves, write_table
from shared.runio import RunDir, environment
from shared.stats import mean_std, paired_difference

if TYPE_CHECKING:
    from experiments.train import Testbed, TrainConfig


def unit_results(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str | None, int, str], dict[str, Any]]:
    """(fold, seed, optimizer) -> {"selected": the record of the best validation accuracy (the first on
    ties), "final": the last epoch's record}."""
    from testbeds import select_by_validation

    groups: dict[tuple[str | None, int, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["fold"], r["seed"], r["optimizer"]), []).append(r)
    return {key: {"selected": select_by_validation(rs), "final": max(rs, key=lambda r: r["epoch"])}
            for key, rs in groups.items()}


def per_seed(units: Mapping[tuple[str | None, int, str], Mapping[str, Any]], optimizer: str, seeds: Sequence[int],
             folds: Sequence[str | None], which: str = "selected", key: str = "test_acc") -> list[float]:
    """One value (test accuracy) per seed: the mean over held-out domains in leave-one-domain-out."""
    return [float(np.mean([units[(fold, seed, optimizer)][which][key] for fold in folds])) for seed in seeds]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def best_on_validation(units: Mapping[tuple[str | None, int, str], Mapping[str, Any]], cfg: TrainConfig,
                       folds: Sequence[str | None]) -> dict[str, list[str]]:
    """For every member listed in several variants (a grid such as sam:rho=0.02, sam:rho=0.05): per seed,
    the variant with the best validation accuracy at its selected epoch (mean over held-out domains; the
    first on ties). The test data plays no part in the choice."""
    from experiments.train import variant

    grids: dict[str, list[str]] = {}
    for label in cfg.optimizers:
        grids.setdefault(variant(label)[0], []).append(label)
    return {member: [max(labels, key=lambda lab: (per_seed(units, lab, [seed], folds, "selected", "val_acc")[0],
                                                  -labels.index(lab))) for seed in cfg.seeds]
            for member, labels in grids.items() if len(labels) > 1}


def result_rows(units: Mapping[tuple[str | None, int, str], Mapping[str, Any]], cfg: TrainConfig,
                folds: Sequence[str | None], timings: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """The results table: per optimizer (and per grid, its best variant on validation), test accuracy
    (selected on validation; at the last epoch) mean and std over seeds, the paired difference to the base
    optimizer with its 95% interval, and the step time."""
    base = cfg.base if cfg.base in cfg.optimizers else None
    base_time = float(np.mean(timings[base])) if base and timings.get(base) else None
    reference = per_seed(units, base, cfg.seeds, folds) if base else None
    entries = [(name, per_seed(units, name, cfg.seeds, folds), per_seed(units, name, cfg.seeds, folds, "final"),
                timings.get(name)) for name in cfg.arms]
    for member, chosen in best_on_validation(units, cfg, folds).items():
        pick = [per_seed(units, label, [seed], folds)[0] for label, seed in zip(chosen, cfg.seeds)]
        last = [per_seed(units, label, [seed], folds, "final")[0] for label, seed in zip(chosen, cfg.seeds)]
        entries.append((f"{member} (best on val)", pick, last, None))
    rows = []
    for name, selected, final, times in entries:
        mean, std = mean_std(selected)
        row: dict[str, Any] = {"optimizer": name, "seeds": len(cfg.seeds), "test_acc": _round(mean),
                               "test_acc_std": _round(std), "final_test_acc": _round(mean_std(final)[0])}
        if reference is not None:
            diff = paired_difference(selected, reference) if name != base else None
            row[f"diff_vs_{base}"] = _round(diff["mean"]) if diff else None
            row["ci95_low"] = _round(diff["ci_low"]) if diff else None
            row["ci95_high"] = _round(diff["ci_high"]) if diff else None
            row["diff_se"] = _round(diff["sem"]) if diff else None
        if cfg.useful:  # USEFUL against the same optimizer on the original data, paired by seed
            from experiments.train import USEFUL

            plain = name.removesuffix(USEFUL)
            diff = paired_difference(selected, per_seed(units, plain, cfg.seeds, folds)) if name != plain else None
            row["useful_diff"] = _round(diff["mean"]) if diff else None
            row["useful_ci95_low"] = _round(diff["ci_low"]) if diff else None
            row["useful_ci95_high"] = _round(diff["ci_high"]) if diff else None
            row["useful_se"] = _round(diff["sem"]) if diff else None
        if base_time:
            row[f"step_time_vs_{base}"] = round(float(np.mean(times)) / base_time, 3) if times else None
        rows.append(row)
    return rows


def pair_rows(units: Mapping[tuple[str | None, int, str], Mapping[str, Any]], cfg: TrainConfig,
              folds: Sequence[str | None]) -> list[dict[str, Any]]:
    """`compare`'s pairs: the paired difference a - b of the selected test accuracy per seed (mean over
    held-out domains), with its 95% interval. A member listed in several variants stands for its best
    variant on validation, chosen per seed."""
    grids = best_on_validation(units, cfg, folds)

    def values(name: str) -> list[float]:
        if name in grids:
            return [per_seed(units, label, [seed], folds)[0] for label, seed in zip(grids[name], cfg.seeds)]
        return per_seed(units, name, cfg.seeds, folds)

    rows = []
    for a, b in cfg.compare:
        ours, theirs = values(a), values(b)
        diff = paired_difference(ours, theirs)
        rows.append({"method": a, "reference": b, "seeds": len(cfg.seeds), "diff": _round(diff["mean"]),
                     "ci95_low": _round(diff["ci_low"]), "ci95_high": _round(diff["ci_high"]),
                     "diff_se": _round(diff["sem"]), "wins": sum(x > y for x, y in zip(ours, theirs))})
    return rows


def lodo_rows(units: Mapping[tuple[str | None, int, str], Mapping[str, Any]], cfg: TrainConfig,
              folds: Sequence[str]) -> list[dict[str, Any]]:
    """One row per optimizer, one column per held-out domain (mean over seeds of the selected test
    accuracy) and their average."""
    from testbeds import lodo_table

    results = {name: {fold: float(np.mean([units[(fold, seed, name)]["selected"]["test_acc"] for seed in cfg.seeds]))
                      for fold in folds} for name in cfg.arms}
    return [{k: _round(v) if isinstance(v, float) else v for k, v in row.items()}
            for row in lodo_table(results, list(folds))]


def mean_curves(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer and epoch, the mean over units of the test accuracy and training loss (for the plot)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["optimizer"], r["epoch"]), []).append(r)
    return [{"optimizer": name, "epoch": epoch, "test_acc": float(np.mean([r["test_acc"] for r in rs])),
             "train_loss": float(np.mean([r["train_loss"] for r in rs]))} for (name, epoch), rs in groups.items()]


def finish(run: RunDir, cfg: TrainConfig, config: dict[str, Any], bed: Testbed, timings: Mapping[str, Sequence[float]],
           notes: Mapping[str, Mapping[str, Any]], wall_s: float) -> dict[str, Any]:
    """Write results.csv/.md (and lodo.csv/.md), curves.png and summary.json; returns the summary.
    `wall_s`: this invocation's wall time (a resumed run's earlier part is not in it)."""
    records = run.metrics()
    units = unit_results(records)
    rows = result_rows(units, cfg, bed.folds, timings)
    what = f"{cfg.dataset}" + (f", label noise {cfg.label_noise:g} ({cfg.label_noise_kind})" if cfg.label_noise else "")
    protocol = {"leave-one-domain-out": ", leave-one-domain-out (mean over held-out domains)",
                "fine-tune": f", pre-trained {cfg.pretrain_epochs} epochs then fine-tuned on {cfg.target_domain!r}, "
                             "tested on the other domains"}.get(cfg.protocol, "")
    title = f"{what}, {cfg.model}, {cfg.epochs} epochs, {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}" \
            + protocol
    write_table(run.path / "results", rows, title=title)
    lodo = None
    if cfg.protocol == "leave-one-domain-out":
        lodo = lodo_rows(units, cfg, [f for f in bed.folds if f is not None])
        write_table(run.path / "lodo", lodo, title=f"{cfg.dataset}: test accuracy on each held-out domain "
                                                   f"(selected on training-domain validation), mean over seeds")
    pairs = pair_rows(units, cfg, bed.folds) if cfg.compare else None
    if pairs:
        write_table(run.path / "pairs", pairs, title=f"{title}: paired differences (a - b) of the selected test "
                                                     "accuracy, per seed, with 95% intervals")
    learning_curves(run.path / "curves.png", mean_curves(records), title=f"{what}: mean over units")
    summary = {
        "results": rows,
        "lodo": lodo,
        "pairs": pairs,
        "units": [{"fold": fold, "seed": seed, "optimizer": name, "selected_epoch": u["selected"]["epoch"],
                   "val_acc": u["selected"]["val_acc"], "test_acc": u["selected"]["test_acc"],
                   "final_test_acc": u["final"]["test_acc"]} for (fold, seed, name), u in units.items()],
        "best_on_validation": best_on_validation(units, cfg, bed.folds),
        "label_noise_flipped": dict(notes["flipped"]),
        "useful": dict(notes["useful"]) or None,
        "domains": bed.suite.definitions if bed.suite is not None else None,
        "config": config,
        "seeds": list(cfg.seeds),
        "wall_s": round(wall_s, 1),
        "step_time_s": {name: float(np.mean(t)) if t else None for name, t in timings.items()},
        "environment": environment(),
    }
    run.write_json("summary.json", summary)
    return summary
