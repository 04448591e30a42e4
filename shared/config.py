"""One typed config mechanism for the whole suite: stdlib dataclasses, YAML files read with
`yaml.safe_load`, and `key.path=value` overrides. Unknown keys and badly typed values are errors
that name the field (`ConfigError("train.lr: expected float, got 'fast'")`)."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "check_finite", "from_dict", "load_config", "plain_value", "read_yaml",
           "to_dict"]

C = TypeVar("C")
# YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string; YAML 1.2 and every user read it as a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NON_FINITE = re.compile(r"[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
    """Build dataclass `cls` from a mapping, checking names and types recursively."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key. Allowed: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path + ': ' if path else ''}{err}") from err


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return plain_value(value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: unknown value {value!r}. Allowed: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        val_tp = args[1] if args else Any
        return {k: _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and (_NUMBER.fullmatch(value.strip()) or _NON_FINITE.fullmatch(value.strip())):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return _finite(float(value), path)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{path}: unsupported config type {tp}")


def _finite(value: float, path: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    return value


def check_finite(cfg: Any) -> None:
    """Refuse inf and nan in the float fields of a config built in Python (from_dict refuses them in
    files and overrides); call from `__post_init__`."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            _finite(value, f.name)


def plain_value(value: Any, path: str) -> Any:
    """A free-form value (optimizer options, say) checked like a typed one where it is a number:
    1e-5 becomes a float, and inf / nan (as numbers or as words) are refused."""
    if isinstance(value, str) and _NON_FINITE.fullmatch(value.strip()):
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and not value.strip().isdigit():
        return float(value)
    if isinstance(value, float):
        return _finite(value, path)
    if isinstance(value, Mapping):
        return {k: plain_value(v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where, and what (a tag outside safe_load's plain values named as such)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if problem.startswith("but ") and getattr(err, "context", None):  # "expected a single document ..., but found"
        problem = f"{err.context}, {problem}"
    tag = re.search(r"tag '?(tag:yaml\.org,2002:)?([^'\s]+)'?", problem) if "constructor" in problem else None
    if tag is not None:
        problem = f"the tag !!{tag.group(2)} is not allowed (configs hold plain values, lists and mappings only)"
    return f"{where}{problem}"


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in YAML file `path`, read with `yaml.safe_load`; every problem (missing,
    unreadable, broken YAML, a Python tag, not a mapping) is one ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path}: not found")
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder, not a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path}: not valid YAML at {_yaml_problem(err)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: expected a mapping (key: value lines) at the top level, "
                          f"got a {type(loaded).__name__}")
    return loaded


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML: 3, 0.1, true, [a, b], null)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r}: expected key=value (e.g. lr=0.1 or sam.rho=0.05)")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: '{part}' is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: {raw!r} is not a valid value ({_yaml_problem(err)})") from None
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """The config `cls` from an optional YAML file and `key=value` overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))
