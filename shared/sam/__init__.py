"""The SAM family: one contract (`Member`, driven by `member_backward`), the perturbing members' protocol
(`SharpnessAware`, driven by `sam_backward`), a registry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from shared.registry import Registry, UnknownNameError
from shared.sam.backward import SamStepStats, chunk, sam_backward
from shared.sam.base import BASE_OPTIMIZERS, BaseOptimizerSpec, SharpnessAware, resolve_base_optimizer
from shared.sam.bn import frozen_bn_stats
from shared.sam.gaqat import GAQAT
from shared.sam.gsam import GSAM
from shared.sam.member import Batch, Member, StepLosses, member_backward
from shared.sam.obf import OBF, obf_ascent_loss
from shared.sam.sagm import SAGM
from shared.sam.sam import ASAM, SAM
from shared.sam.trajectory import MESA, SAF, trajectory_loss
from shared.sam.tram import TRAM, TRAMX, TRAMInit, TRAMPrev, trust_region_distance
from shared.sam.udim import UDIM

OPTIMIZERS: Registry[type[Member]] = Registry("optimizer")
OPTIMIZERS.register("sam")(SAM)
OPTIMIZERS.register("asam")(ASAM)
OPTIMIZERS.register("gsam")(GSAM)
OPTIMIZERS.register("obf")(OBF)
OPTIMIZERS.register("sagm")(SAGM)
OPTIMIZERS.register("gaqat")(GAQAT)
OPTIMIZERS.register("saf")(SAF)
OPTIMIZERS.register("mesa")(MESA)
OPTIMIZERS.register("tram-prev")(TRAMPrev)
OPTIMIZERS.register("tram-init")(TRAMInit)
OPTIMIZERS.register("tram-x")(TRAMX)
OPTIMIZERS.register("udim")(UDIM)


def build_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    base: BaseOptimizerSpec = "sgd",
    **kwargs: Any,
) -> Optimizer:
    """A SAM-family member by name over `base`, or a plain base optimizer ("sgd", "adamw", ...)
    when `name` is one: configs can then compare SAM with its base optimizer by name alone."""
    if name.lower() in OPTIMIZERS:
        return OPTIMIZERS.get(name)(params, base, **kwargs)
    if name.lower() in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS.get(name)(params, **kwargs)
    allowed = OPTIMIZERS.names() + BASE_OPTIMIZERS.names()
    close = difflib.get_close_matches(str(name).lower(), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    raise UnknownNameError(f"optimizer: unknown optimizer '{name}'{hint} Allowed: {', '.join(allowed)}")


__all__ = [
    "ASAM",
    "BASE_OPTIMIZERS",
    "GAQAT",
    "GSAM",
    "MESA",
    "OBF",
    "OPTIMIZERS",
    "SAF",
    "SAGM",
    "SAM",
    "TRAM",
    "UDIM",
    "Batch",
    "Member",
    "SamStepStats",
    "SharpnessAware",
    "StepLosses",
    "build_optimizer",
    "chunk",
    "frozen_bn_stats",
    "member_backward",
    "obf_ascent_loss",
    "resolve_base_optimizer",
    "sam_backward",
    "trajectory_loss",
    "trust_region_distance",
]
