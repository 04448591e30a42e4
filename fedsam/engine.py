"""The engines that drive a `FedRun`: the fast in-process loop (no Flower, no Ray: for sweeps and
tests) and, through `run_fed`, the Flower simulation (`fedsam.server_app.run_flower`). Both call
the same `local_update`, so the same config and seed give the same metrics. `run_sweep` runs a
grid of configs (a table of the paper) one after the other and compares them."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsam.client import local_update
from fedsam.compare import compare_runs
from fedsam.config import FedConfig
from fedsam.run import FedRun
from shared.config import ConfigError, apply_overrides, from_dict, read_yaml
from shared.runio import check_run_name


def run_inprocess(cfg: FedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) `cfg` with every node trained in turn in this process; returns the summary.
    Nodes dropped by the `fail_prob` simulation get no task and are left out of the mixing (and
    keep their member state)."""
    with FedRun(cfg, progress=progress) as run:
        for r in range(run.start_round, run.rounds):
            updates = {node: local_update(state, node, r, cfg, run.data, member_state=run.member_state[node])
                       for node, state in run.round_tasks(r)}
            run.finish_round(r, updates)
        return run.finish()


def run_batched(cfg: FedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) `cfg` with each round's nodes trained in vectorized passes
    (`fedsam.batched`); the same metrics as `run_inprocess` to float tolerance."""
    from fedsam.batched import BatchedTrainer

    with FedRun(cfg, progress=progress) as run:
        trainer = BatchedTrainer(cfg, run.data, run.spec)
        run.evaluate_nodes = trainer.evaluate_nodes
        for r in range(run.start_round, run.rounds):
            run.finish_round(r, trainer.round(r, run.round_tasks(r)))
        return run.finish()


def run_fed(cfg: FedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` on the engine it names (`engine: inprocess | batched | auto | flower`); `auto` runs
    batched where the optimizer and the model allow it and says why it falls back otherwise."""
    if cfg.engine == "inprocess":
        return run_inprocess(cfg, progress=progress)
    if cfg.engine in ("batched", "auto"):
        from fedsam.batched import batch_blocker

        reason = batch_blocker(cfg)
        if reason is None:
            return run_batched(cfg, progress=progress)
        if cfg.engine == "batched":
            raise ConfigError(f"engine: batched cannot run this config: {reason}; use engine=inprocess")
        from tqdm.auto import tqdm

        tqdm.write(f"{cfg.name}: engine=auto runs in-process (one node at a time): {reason}")
        return run_inprocess(cfg, progress=progress)
    from fedsam.server_app import run_flower  # imports flwr: only when asked for

    return run_flower(cfg, progress=progress)


@dataclass(frozen=True)
class Sweep:
    """A grid of runs from a sweep file: its name (runs go to <out_dir>/<name>/<run>/ and the
    comparison to <out_dir>/<name>/compare.*), the title of the table, and the validated configs."""

    name: str
    title: str
    out: Path
    configs: list[FedConfig]
    cells: list[dict[str, str]] = field(default_factory=list)  # each config's grid values, by axis (printable)
    reference: dict[str, str] | None = None  # with a `seed` axis: the cell the paired differences are taken to


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep file: FedConfig fields shared by every run, plus
        sweep: {name: ..., title: ..., grid: {axis: [value, ...], ...}}
    where a value is one field's value (axis = the field), or a mapping of several fields set
    together (axis = a label, e.g. data: [{partitioner: dirichlet, alpha: 0.3}, ...]). One run per
    combination, named by its values; every config is validated before any run starts."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    spec = data.pop("sweep", None)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("grid"), Mapping) or not spec["grid"]:
        raise ConfigError(f"sweep: {path} needs a 'sweep:' section with a non-empty 'grid:' mapping of lists")
    unknown = sorted(set(spec) - {"name", "title", "grid", "reference"})
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}: unknown key. Allowed: grid, name, reference, title")
    grid: Mapping[str, Any] = spec["grid"]
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{axis}: expected a non-empty list of values, got {values!r}")
    reference = _reference(spec.get("reference"), grid)
    name = str(spec.get("name", path.stem))
    check_run_name(name, "sweep.name")
    base = apply_overrides(data, overrides)
    out = Path(str(base.get("out_dir", "runs"))) / name
    configs, cells = [], []
    for combo in itertools.product(*grid.values()):
        fields: dict[str, Any] = copy.deepcopy(base)
        parts = []
        for axis, value in zip(grid, combo):
            fields.update(value if isinstance(value, Mapping) else {axis: value})
            parts += [str(v) for v in value.values()] if isinstance(value, Mapping) else [_part(axis, value)]
        fields.update(out_dir=str(out), name=re.sub(r"[/\\]", "_", "-".join(parts)).lstrip("."))
        configs.append(from_dict(FedConfig, fields))
        cells.append({axis: _cell(value) for axis, value in zip(grid, combo)})
    return Sweep(name, str(spec.get("title", name)), out, configs, cells, reference)


def _cell(value: Any) -> str:
    """A grid value as a table cell: dirichlet(alpha=0.1) for a mapping, the value otherwise."""
    if isinstance(value, Mapping):
        first, *rest = value.items()
        return f"{first[1]}({', '.join(f'{k}={v}' for k, v in rest)})" if rest else str(first[1])
    return str(value)


def _reference(value: Any, grid: Mapping[str, Any]) -> dict[str, str] | None:
    """`reference: {axis: value}` (e.g. {algorithm: dfedavg}): the paired differences over the `seed` axis
    are taken to the cell with that value and the same other values."""
    if value is None:
        return None
    if "seed" not in grid:
        raise ConfigError("sweep.reference: paired differences need a 'seed' axis in sweep.grid")
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"sweep.reference: expected one axis and its value, e.g. {{algorithm: dfedavg}}, got {value!r}")
    (axis, wanted), = value.items()
    if axis not in grid or axis == "seed":
        raise ConfigError(f"sweep.reference: {axis!r} is not an axis of sweep.grid (or is the seed axis)")
    cells = [_cell(v) for v in grid[axis]]
    if str(wanted) not in cells:
        raise ConfigError(f"sweep.reference.{axis}: {wanted!r} is not one of its values: {', '.join(cells)}")
    return {axis: str(wanted)}


def _part(axis: str, value: Any) -> str:
    """A run-name part: a string value as is, a number with its field (gossip_steps-4)."""
    return value if isinstance(value, str) else f"{axis}-{value}"


def run_sweep(sweep: Sweep, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) every config of `sweep` in turn, then write its comparison; returns the rows."""
    for cfg in sweep.configs:
        run_fed(cfg, progress=progress)
    rows = compare_runs([Path(cfg.out_dir) / str(cfg.name) for cfg in sweep.configs], sweep.out, title=sweep.title)
    if sweep.cells and "seed" in sweep.cells[0]:
        seed_table(rows, sweep)
    return rows


def seed_table(rows: Sequence[Mapping[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """`compare_seeds.csv/.md`: the runs grouped over the `seed` axis, with mean ± std of the final test and
    personalized accuracy and (with `reference`) the paired difference to the reference cell of the same
    seed, with its 95% interval."""
    from shared.report import write_table
    from shared.stats import mean_std, paired_difference

    groups: dict[tuple[tuple[str, str], ...], dict[str, Mapping[str, Any]]] = {}
    for cell, row in zip(sweep.cells, rows):
        key = tuple((axis, value) for axis, value in cell.items() if axis != "seed")
        groups.setdefault(key, {})[cell["seed"]] = row
    out = []
    for key, by_seed in groups.items():
        seeds = sorted(by_seed)
        acc = [by_seed[s]["test_acc"] for s in seeds]
        mean, std = mean_std(acc)
        entry: dict[str, Any] = {**dict(key), "seeds": len(seeds), "test_acc": round(mean, 4),
                                 "test_acc_std": None if std is None else round(std, 4),
                                 "personal_acc": round(mean_std([by_seed[s]["personal_acc"] for s in seeds])[0], 4)}
        if sweep.reference is not None:
            (axis, wanted), = sweep.reference.items()
            ref = groups[tuple((a, wanted if a == axis else v) for a, v in key)]
            diff = None if dict(key)[axis] == wanted else paired_difference(acc, [ref[s]["test_acc"] for s in seeds])
            label = f"diff_vs_{wanted}"
            entry[label] = None if diff is None else round(diff["mean"], 4)
            for name, field_ in (("ci95_low", "ci_low"), ("ci95_high", "ci_high"), ("diff_se", "sem")):
                entry[name] = None if diff is None or diff[field_] is None else round(diff[field_], 4)
        out.append(entry)
    write_table(sweep.out / "compare_seeds", out, title=f"{sweep.title}: mean over seeds"
                + (f", paired differences to {next(iter(sweep.reference.values()))}" if sweep.reference else ""))
    return out
