"""Argument checks whose errors name the field and the allowed values."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")  # noqa: TRY004 - bad input is a ValueError
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, low: int, error: type[ValueError] = ValueError) -> None:
    """An integer (numpy's too, not bool) >= low; `error` lets a config raise its ConfigError."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise error(f"{name}: expected an integer >= {low}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if _check_number(name, value) <= 0:
        raise ValueError(f"{name}: expected a value > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    if _check_number(name, value) < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value!r}")


def check_range(name: str, value: Any, low: float, high: float) -> None:
    """low <= value <= high."""
    if not low <= _check_number(name, value) <= high:
        raise ValueError(f"{name}: expected a value in [{low}, {high}], got {value!r}")


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}. Allowed: {', '.join(map(str, allowed))}")


def available_devices() -> list[str]:
    """The torch devices of this machine, as a user would name them."""
    import torch

    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str, value: Any, allow_auto: bool = True, here: bool = True) -> None:
    """`value` names a device: auto (if allowed), cpu, cuda (= cuda:0), cuda:N, mps; with `here`, one
    that this machine has (configs written for a GPU machine are checked so where they are run)."""
    import torch

    present = available_devices()
    allowed = (["auto"] if allow_auto else []) + present
    if allow_auto and value == "auto":
        return
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except RuntimeError:
        device = None
    if device is None:
        raise ValueError(f"{name}: unknown device {value!r}. Allowed here: {', '.join(allowed)}")
    if not here:
        return
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: {value!r} is not on this machine. Allowed here: {', '.join(allowed)}")
    if device.type not in ("cpu", "cuda") and str(device) not in present:
        raise ValueError(f"{name}: {value!r} is not on this machine. Allowed here: {', '.join(allowed)}")
