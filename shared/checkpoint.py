"""Checkpoints as one safetensors file: the tensors, and everything else as JSON in the file's
metadata, never pickles of code. Nested state (model and optimizer state dicts) is flattened to
dotted keys. The file is replaced atomically, so a run killed at any moment finds either the
previous checkpoint or the new one, whole; a damaged file is an error that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.errors import RunStateError
from shared.runio import atomic_replace

_TENSOR = "__tensor__"
_STATE = "samsuite.state"  # the metadata key holding the JSON part


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors into `tensors` under dotted keys; return the JSON-able rest with markers."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().contiguous().cpu()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    return obj


def _join(meta: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(meta, dict) and _TENSOR in meta:
        if meta[_TENSOR] not in tensors:
            raise RunStateError(f"{path}: names a tensor {meta[_TENSOR]!r} that it does not hold (the file is "
                                "damaged); set resume=false to start over")
        return tensors[meta[_TENSOR]]
    if isinstance(meta, dict) and "__dict__" in meta:
        return {k: _join(v, tensors, path) for k, v in meta["__dict__"]}
    if isinstance(meta, dict) and "__list__" in meta:
        return [_join(v, tensors, path) for v in meta["__list__"]]
    return meta


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts/lists of tensors and JSON values) as the safetensors file `path`."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_split(state, "", tensors))
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata={_STATE: meta}))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The state saved by `save_checkpoint` at `path`, or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    damaged = f"{path}: is not a readable samsuite checkpoint"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get(_STATE)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise RunStateError(f"{damaged} ({err}); the file is truncated or damaged: set resume=false to start "
                            "over") from None
    if meta is None:
        raise RunStateError(f"{damaged} (no samsuite state in its header); set resume=false to start over")
    try:
        state = json.loads(meta)
    except ValueError:
        raise RunStateError(f"{damaged} (its state is not JSON); set resume=false to start over") from None
    return _join(state, tensors, path)
