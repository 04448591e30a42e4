"""The engines that drive a `FedRun`: the fast in-process loop (no Flower, no Ray: for sweeps and
tests) and, through `run_fed`, the Flower simulation (`fedsam.flower_app.run_flower`). Both call
the same `local_update`, so the same config and seed give the same metrics. `run_sweep` runs a
grid of configs (a table of the paper) one after the other and compares them."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    Nodes dropped by the `fail_prob` simulation get no task and are left out of the mixing."""
    with FedRun(cfg, progress=progress) as run:
        for r in range(run.start_round, run.rounds):
            updates = {node: local_update(state, node, r, cfg, run.data) for node, state in run.round_tasks(r)}
            run.finish_round(r, updates)
        return run.finish()


def run_fed(cfg: FedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` on the engine it names (`engine: inprocess | flower`)."""
    if cfg.engine == "inprocess":
        return run_inprocess(cfg, progress=progress)
    from fedsam.flower_app import run_flower  # imports flwr: only when asked for

    return run_flower(cfg, progress=progress)


@dataclass(frozen=True)
class Sweep:
    """A grid of runs from a sweep file: its name (runs go to <out_dir>/<name>/<run>/ and the
    comparison to <out_dir>/<name>/compare.*), the title of the table, and the validated configs."""

    name: str
    title: str
    out: Path
    configs: list[FedConfig]


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
    unknown = sorted(set(spec) - {"name", "title", "grid"})
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}: unknown key. Allowed: grid, name, title")
    grid: Mapping[str, Any] = spec["grid"]
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{axis}: expected a non-empty list of values, got {values!r}")
    name = str(spec.get("name", path.stem))
    check_run_name(name, "sweep.name")
    base = apply_overrides(data, overrides)
    out = Path(str(base.get("out_dir", "runs"))) / name
    configs = []
    for combo in itertools.product(*grid.values()):
        fields: dict[str, Any] = copy.deepcopy(base)
        parts = []
        for axis, value in zip(grid, combo):
            fields.update(value if isinstance(value, Mapping) else {axis: value})
            parts += [str(v) for v in value.values()] if isinstance(value, Mapping) else [_part(axis, value)]
        fields.update(out_dir=str(out), name=re.sub(r"[/\\]", "_", "-".join(parts)).lstrip("."))
        configs.append(from_dict(FedConfig, fields))
    return Sweep(name, str(spec.get("title", name)), out, configs)


def _part(axis: str, value: Any) -> str:
    """A run-name part: a string value as is, a number with its field (gossip_steps-4)."""
    return value if isinstance(value, str) else f"{axis}-{value}"


def run_sweep(sweep: Sweep, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) every config of `sweep` in turn, then write its comparison; returns the rows."""
    for cfg in sweep.configs:
        run_fed(cfg, progress=progress)
    return compare_runs([Path(cfg.out_dir) / str(cfg.name) for cfg in sweep.configs], sweep.out, title=sweep.title)
