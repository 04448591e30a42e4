"""Name -> object registries (after lm-eval's `Registry`): a member is added by registering it,
never by editing a switch; unknown names get a "did you mean" and the allowed list."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """An unknown name for a registry; the message names the field and the allowed values."""


class Registry(Generic[T]):
    """Maps names (lower case) to objects, or lazily to "module:attr" targets that are imported on
    first use, so that registering a heavy member (transformers, flwr) costs nothing until used."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T | str] = {}

    def register(self, *names: str, target: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under `names`; with `target`, registers "module:attr" lazily."""
        if not names:
            raise ValueError("register() needs at least one name")

        def add(obj: T | str) -> None:
            for name in names:
                key = name.lower()
                if key in self._items:
                    raise ValueError(f"{self.kind} '{key}' is registered twice")
                self._items[key] = obj

        if target is not None:
            add(target)
            return lambda obj: obj

        def decorator(obj: T) -> T:
            add(obj)
            return obj

        return decorator

    def get(self, name: str, field: str | None = None) -> T:
        """The object registered as `name`; `field` names the config field in the error message."""
        key = str(name).lower()
        if key not in self._items:
            raise UnknownNameError(self.unknown_message(name, field))
        item = self._items[key]
        if isinstance(item, str):
            module, _, attr = item.partition(":")
            item = getattr(importlib.import_module(module), attr)
            self._items[key] = item
        return item

    def unknown_message(self, name: str, field: str | None = None) -> str:
        close = difflib.get_close_matches(str(name).lower(), self.names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{field or self.kind}: unknown {self.kind} '{name}'{hint} Allowed: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def check_keyword_options(builder: Any, options: Mapping[str, Any], what: str, field: str = "model_options") -> None:
    """A ValueError naming the first of `options` that `builder` takes no keyword-only argument for, and
    the ones it takes (a builder's options come from configs as plain mappings)."""
    allowed = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{field}.{unknown[0]}: unknown option of {what}. Allowed: {', '.join(allowed) or '(none)'}")
