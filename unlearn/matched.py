"""Matched efficacy (`matched:` in the run config, issue 17): compare methods only where they unlearned
to the same level. Comparing what relearning brings back is confounded by where each method started:
one that barely unlearned has little to recover. So, for each method and seed, a calibration run
picks the unlearning budget (optimizer steps) on a validation split that the reported metrics never
see: the smallest budget whose forget efficacy lands within `band` of the target (default: the
retrained model's value) while utility stays at or above `floor`. A method that reaches the band at
no budget is reported as unmatched and left out of the comparison.

The validation split is the benchmark's `mc/<split>_val` tables (the toy: the same facts asked in a
fourth wording, never trained on and never tested); its questions must not overlap the test
questions, and the calibration evaluates a view of the benchmark that holds the validation tables
alone, so the test tables cannot reach it.

The calibration trains once to the largest budget, evaluating the validation metrics at every
budget; the run then trains with the chosen budget as its `steps`. With a constant learning rate
(the toy configs) that run is the calibration's prefix; with a decaying schedule it is the schedule
sized for the chosen budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from shared.config import ConfigError

VALIDATION_SUFFIX = "_val"
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

    def __post_init__(self) -> None:
        for name in ("band", "floor", "target"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"matched.{name}: expected a fraction in [0, 1], got {value!r}")
        if not self.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ConfigError(f"matched.budgets: expected a list of step counts >= 1, got {self.budgets!r}")
        if sorted(set(self.budgets)) != list(self.budgets):
            raise ConfigError(f"matched.budgets: expected increasing step counts, got {self.budgets}")

    def validation_metrics(self) -> list[str]:
        return [m + VALIDATION_SUFFIX for m in (self.metric, self.utility) if m is not None]

    @property
    def every(self) -> int:
        """The evaluation interval that visits every budget."""
        return reduce(math.gcd, self.budgets)


def check_validation(bench: Any, settings: MatchedSettings, available: Sequence[str]) -> None:
    """The validation metrics exist on `bench`, and their questions are not test questions."""
    for field_name, metric in (("metric", settings.metric), ("utility", settings.utility)):
        if metric is not None and metric + VALIDATION_SUFFIX not in available:
            raise ConfigError(f"matched.{field_name}: {bench.name} has no validation split for {metric} (a table "
                              f"mc/<split>{VALIDATION_SUFFIX}); it has: {', '.join(bench.mc)}")
    for split in [s for s in bench.mc if s.endswith(VALIDATION_SUFFIX)]:
        test = split[: -len(VALIDATION_SUFFIX)]
        if test in bench.mc:
            shared = set(bench.mc[split]["question"]) & set(bench.mc[test]["question"])
            if shared:
                raise ConfigError(f"matched: the validation split mc/{split} shares {len(shared)} question(s) with "
                                  f"the test split mc/{test} (e.g. {min(shared)!r}); a calibration must not see "
                                  "the questions it is judged on")


def validation_view(bench: Any) -> Any:
    """`bench` with its validation tables alone: what the calibration evaluates (no test table in reach)."""
    from dataclasses import replace

    return replace(bench, mc={k: v for k, v in bench.mc.items() if k.endswith(VALIDATION_SUFFIX)}, muse={})


def choose_budget(curve: Sequence[Mapping[str, Any]], settings: MatchedSettings, target: float
                  ) -> dict[str, Any]:
    """The smallest budget of `curve` (validation metrics at each step) inside the band with utility at or
    above the floor; {"chosen": steps or None, "band": [low, high], "target", "rows": the budgets' rows}."""
    metric, utility = (m + VALIDATION_SUFFIX if m else None for m in (settings.metric, settings.utility))
    at = {row["step"]: row for row in curve}
    missing = [b for b in settings.budgets if b not in at]
    if missing:
        raise ValueError(f"curve: no evaluation at the budgets {missing}")
    rows = [at[b] for b in settings.budgets]
    chosen = next((row["step"] for row in rows if abs(row[metric] - target) <= settings.band + TOLERANCE
                   and (utility is None or row[utility] >= settings.floor)), None)
    return {"chosen": chosen, "target": target, "band": [target - settings.band, target + settings.band],
            "floor": settings.floor if utility else None, "rows": rows}
