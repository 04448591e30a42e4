"""Matched efficacy (`matched:` in the run config, issue 17): compare methods only where they unlearned
to the same level. Comparing what relearning brings back is confounded by where each method started:
one that barely unlearned has little to recover. So, for each method and seed, a calibration run
picks the unlearning budget (optimizer steps) on a validation split that the reported metrics never
see: the smallest budget whose forget efficacy lands within `band` of the target (default: the
retrained model's value) while utility stays at or above `floor`. A method that reaches the band at
no budget is reported as unmatched and left out of the comparison.

The validation split is the benchmark's "<table>_val" twins of its question tables (the toy: the same
facts asked in a fourth wording, never trained on and never tested). A benchmark without one (WMDP,
MUSE) gets one from `split`: a seeded fraction of each question table's distinct questions is held out
(`split_validation`), and the reported metrics are computed on the rest. Its questions must not
overlap the test questions, and the calibration evaluates a view of the benchmark that holds the
tables of the validation metrics alone, so the test tables cannot reach it.

The calibration trains until the first budget inside the band (or to the largest), evaluating the
validation metrics at every budget. With a constant learning rate (every matched config) the rate does
not depend on the total steps, so the calibration stopped there is the run of that budget and its model
is the unit's; with a decaying schedule the unit trains again, with the schedule sized for the budget.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from shared.config import ConfigError
from unlearn.benchmarks.base import SECTIONS
from unlearn.eval import METRICS, SPLITTABLE, VALIDATION, splittable

TOLERANCE = 1e-12  # accuracies are fractions of counts: 0.31 - 0.26 is 0.05 plus a rounding error


@dataclass
class MatchedSettings:
    """How the unlearning budget of each method is matched (see the module docstring)."""

    metric: str = field(default="forget_acc_cloze", metadata={
        "help": "the forget efficacy metric; calibrated on its validation version (metric + '_val')"})
    band: float = field(default=0.05, metadata={"help": "|validation metric - target| <= band"})
    target: float | None = field(default=None, metadata={"help": "None: the retrained model's validation value"})
    utility: str | None = field(default="utility_acc_cloze", metadata={
        "help": "the utility metric kept above the floor (validation version); None: no floor"})
    floor: float = field(default=0.0, metadata={"help": "the lowest validation utility a chosen budget may have"})
    budgets: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 30, 40],
                               metadata={"help": "candidate unlearning steps, increasing"})
    split: float | None = field(default=None, metadata={
        "help": "for a benchmark without a validation split (WMDP, MUSE): the fraction of each question table's "
                "distinct questions held out as one; the reported metrics are then on the rest. None: the "
                "benchmark's own (the toy's fourth wording)"})
    split_seed: int = field(default=0, metadata={"help": "which questions `split` holds out"})

    def __post_init__(self) -> None:
        for name in ("band", "floor", "target"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"matched.{name}: expected a fraction in [0, 1], got {value!r}")
        if not self.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ConfigError(f"matched.budgets: expected a list of step counts >= 1, got {self.budgets!r}")
        if sorted(set(self.budgets)) != list(self.budgets):
            raise ConfigError(f"matched.budgets: expected increasing step counts, got {self.budgets}")
        if self.split is not None and not (isinstance(self.split, float) and 0.0 < self.split < 1.0):
            raise ConfigError(f"matched.split: expected a fraction strictly between 0 and 1 (e.g. 0.2), or null, "
                              f"got {self.split!r}")

    def validation_metrics(self) -> list[str]:
        return [m + VALIDATION for m in (self.metric, self.utility) if m is not None]

    @property
    def every(self) -> int:
        """The evaluation interval that visits every budget."""
        return math.gcd(*self.budgets)


def check_validation(bench: Any, settings: MatchedSettings, available: Sequence[str]) -> None:
    """The validation metrics exist on `bench`, and their questions are not test questions."""
    for field_name, metric in (("metric", settings.metric), ("utility", settings.utility)):
        if metric is not None and metric + VALIDATION not in available:
            hint = "" if settings.split is not None else " (set matched.split, e.g. 0.2, to hold out a fraction of " \
                "its questions as one)"
            have = ", ".join(m for m in available if m.endswith(VALIDATION)) or "none"
            raise ConfigError(f"matched.{field_name}: {bench.name} has no validation split for {metric}{hint}; "
                              f"its validation metrics: {have}")
    for section, tables in ((s, getattr(bench, s)) for s in SPLITTABLE):
        for key in [k for k in tables if splittable(section, k) and k + VALIDATION in tables]:
            column = _question_column(tables[key])
            shared = set(tables[key + VALIDATION][column]) & set(tables[key][column])
            if shared:
                raise ConfigError(f"matched: the validation split {section}/{key}{VALIDATION} shares "
                                  f"{len(shared)} {column}(s) with the test split {section}/{key} (e.g. "
                                  f"{min(shared)!r}); a calibration must not see the questions it is judged on")


def _question_column(table: Any) -> str:
    """What identifies a row: the question (multiple choice, KnowMem) or the prompt (VerbMem)."""
    return "question" if "question" in table.column_names else "prompt"


def split_validation(bench: Any, fraction: float, seed: int) -> Any:
    """`bench` with a validation twin "<key>_val" of each question table: `fraction` of its distinct
    questions (by text, so a question asked twice stays on one side), drawn with `seed` and the table's
    name; the test table keeps the others, in their order. Lazy, like the tables: nothing is loaded here."""
    replaced = {}
    for section in SPLITTABLE:
        tables = getattr(bench, section)
        keys = [k for k in tables if splittable(section, k)]
        clash = [k for k in keys if k + VALIDATION in tables]
        if clash:
            raise ConfigError(f"matched.split: {bench.name} has a validation split already ({section}/{clash[0]}"
                              f"{VALIDATION}); leave matched.split unset to use it")
        halves = {k: _halves(tables, k, fraction, seed) for k in keys}
        replaced[section] = tables.replaced({
            **{k: (lambda h=h: h()[0]) for k, h in halves.items()},
            **{k + VALIDATION: (lambda h=h: h()[1]) for k, h in halves.items()}})
    return replace(bench, **replaced)


def _halves(tables: Mapping[str, Any], key: str, fraction: float, seed: int) -> Callable[[], tuple[Any, Any]]:
    @functools.cache
    def halves() -> tuple[Any, Any]:
        table = tables[key]
        rows = table[_question_column(table)]
        distinct = list(dict.fromkeys(rows))
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        held = {distinct[i] for i in rng.permutation(len(distinct))[: round(fraction * len(distinct))]}
        if not held or len(held) == len(distinct):
            raise ConfigError(f"matched.split: {fraction} of the {len(distinct)} distinct questions of {key} leaves "
                              "one side empty; use a fraction that keeps both")
        return (table.select([i for i, q in enumerate(rows) if q not in held]),
                table.select([i for i, q in enumerate(rows) if q in held]))

    return halves


def validation_view(bench: Any, metrics: Sequence[str]) -> Any:
    """`bench` with the tables of the validation `metrics` alone: what the calibration evaluates (no test
    table in reach)."""
    needs = {need for name in metrics for need in METRICS.get(name).needs}
    tables = {section: {key: getattr(bench, section)[key] for s, key in needs if s == section}
              for section in SECTIONS}
    return replace(bench, **tables)


def fits(values: Mapping[str, Any], settings: MatchedSettings, target: float) -> bool:
    """Whether validation `values` are inside the band with utility at or above the floor."""
    metric, utility = (m + VALIDATION if m else None for m in (settings.metric, settings.utility))
    return abs(values[metric] - target) <= settings.band + TOLERANCE and (
        utility is None or values[utility] >= settings.floor)


def choose_budget(curve: Sequence[Mapping[str, Any]], settings: MatchedSettings, target: float
                  ) -> dict[str, Any]:
    """The smallest budget of `curve` (validation metrics at each step) inside the band with utility at or
    above the floor; {"chosen": steps or None, "band": [low, high], "target", "rows": the budgets' rows}.
    The curve may end at the chosen budget (a calibration stops there: the later budgets cannot be chosen)."""
    at = {row["step"]: row for row in curve}
    rows = [at[b] for b in settings.budgets if b in at]
    chosen = next((row["step"] for row in rows if fits(row, settings, target)), None)
    missing = [b for b in settings.budgets if b not in at and (chosen is None or b < chosen)]
    if missing:
        raise ValueError(f"curve: no evaluation at the budgets {missing}")
    return {"chosen": chosen, "target": target, "band": [target - settings.band, target + settings.band],
            "floor": settings.floor if settings.utility else None, "rows": rows}
