"""Benchmarks of samsuite (`samsuite bench ...`): ratios measured in one run, printed and saved as JSON."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console


def console() -> Console:
    """A rich console; on a pipe or a log file (no width to respect) a wide one, so tables do not wrap."""
    out = Console()
    return out if out.is_terminal else Console(width=150)


def round_robin(contenders: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per call of each contender and each one's warm-up result: after one warm-up
    call each, `repeats` rounds with the order rotated every round (so that drift of a shared
    machine hits all alike), the garbage collector paused."""
    results = {name: fn() for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_enabled:
            gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}, results
