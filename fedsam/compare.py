"""Results across runs: one table row per run (final and best test accuracy, personalized
accuracy, consensus distance, bytes sent) and a plot of accuracy and consensus distance against
rounds. `samsuite fed compare RUN...` calls `compare_runs`; every run writes its own one-row
table and plot with the same functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsam.algorithms import ALGORITHMS
from shared.config import ConfigError, read_yaml
from shared.report import save_figure, write_table
from shared.runio import RunDir

# The partitioner option shown next to its name in the table (the others have none).
PARTITION_OPTION = {"dirichlet": "alpha", "pathological": "classes_per_node"}


def load_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, metrics records) of a run folder; a run still in progress has fewer records."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{path}: not a fedsam run folder (no config.yaml)")
    config = read_yaml(config_path, "run config")
    if "algorithm" not in config or "num_nodes" not in config:
        raise ConfigError(f"{path}: config.yaml is not a fedsam run's (no algorithm / num_nodes)")
    return config, RunDir(path).metrics()


def _fmt(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def run_row(name: str, config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The table row of one run: settings that tell runs apart, then the results of its last
    evaluated round (best test accuracy over all evaluated rounds)."""
    evals = [r for r in records if r.get("test_acc") is not None]
    final = evals[-1] if evals else {}
    last = records[-1] if records else {}
    q = config.get("gossip_steps") or ALGORITHMS.get(config["algorithm"]).gossip_steps
    option = PARTITION_OPTION.get(config["partitioner"])
    partition = f"{config['partitioner']}({config[option]})" if option else config["partitioner"]
    consensus = last.get("consensus_distance")
    return {
        "run": name,
        "algorithm": config["algorithm"] + (f"[{config['optimizer']}]" if config.get("optimizer") else ""),
        "topology": config["topology"] + ("(tv)" if config.get("time_varying") else ""),
        "Q": q,
        "data": f"{config['dataset']} {partition}",
        "nodes": config["num_nodes"],
        "rounds": last.get("round", 0),
        "test_acc": _fmt(final.get("test_acc")),
        "best_test_acc": _fmt(max((r["test_acc"] for r in evals), default=None)),
        "personal_acc": _fmt(final.get("personal_acc_mean")),
        "personal_std": _fmt(final.get("personal_acc_std")),
        "consensus_distance": None if consensus is None else float(f"{consensus:.3g}"),
        "MB_sent": _fmt(last["bytes_sent"] / 1e6, 2) if last else None,
        "time_s": _fmt(last.get("time_s"), 1),
    }


def compare_runs(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> list[dict[str, Any]]:
    """`out`/compare.csv, compare.md and compare.png over the run folders `paths`; returns the rows."""
    if not paths:
        raise ValueError("runs: expected at least one run folder")
    runs = {}
    for path in paths:
        name = Path(path).name
        if name in runs:
            raise ValueError(f"runs: two runs are named {name!r}; compare folders with distinct names")
        runs[name] = load_run(path)
    rows = [run_row(name, config, records) for name, (config, records) in runs.items()]
    out = Path(out)
    write_table(out / "compare", rows, title=title)
    plot_runs(out / "compare.png", {name: records for name, (_, records) in runs.items()}, title=title or "fedsam runs")
    return rows


def plot_runs(path: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str) -> None:
    """Test accuracy of the averaged model (solid) and mean personalized accuracy (dashed), and
    the consensus distance, against rounds; one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, cd_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for color, (name, records) in zip(_colors(len(runs)), runs.items()):
        evals = [r for r in records if r.get("test_acc") is not None]
        rounds = [r["round"] for r in evals]
        acc_ax.plot(rounds, [100 * r["test_acc"] for r in evals], color=color, label=name)
        if evals and evals[0].get("personal_acc_mean") is not None:
            acc_ax.plot(rounds, [100 * r["personal_acc_mean"] for r in evals], color=color, linestyle="--")
        cd_ax.plot([r["round"] for r in records], [r["consensus_distance"] for r in records], color=color, label=name)
    acc_ax.set(xlabel="round", ylabel="accuracy (%)", title="Test acc. of the averaged model (—), personal (--)")
    # symlog: full averaging drives the distance to exactly 0, which a log axis cannot show
    cd_ax.set_yscale("symlog", linthresh=1e-6)
    cd_ax.set(xlabel="round", ylabel="(1/N) Σ ||x_i - x̄||²", title="Consensus distance")
    for ax in (acc_ax, cd_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path)


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
