"""Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark: Measuring and
Reducing Malicious Use With Unlearning"). On forget text, steer the hidden states h_l (the output
of decoder layer l, before any final norm) towards c * u (u a random unit vector, seeded); on
retain text, keep h_l where the frozen model puts it:

    l_f = E ||h_l(x_f) - c u||^2 / d        l_r = E ||h_l(x_r) - h_l^frozen(x_r)||^2 / d

means over non-padding positions, d the hidden size; the loop weights l_r by gamma (RMU's alpha,
1200 for Zephyr-7B). Only `rmu_params` of the layers `rmu_update_layers` are updated (the
reference code updates mlp.down_proj of layers 5-7, with l = 7 and c = 6.5).

The frozen activations are computed once, before the first step, for every retain sample and kept
on the CPU (N_r x T x d values): the frozen model is never held in memory next to the trained one."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from shared.seeding import derive_seed
from unlearn.data import LMBatch
from unlearn.distributed import world
from unlearn.objectives.base import OBJECTIVES, Objective, ObjectiveContext, SetupData, per_sample

CONTROL_KEY, FROZEN_KEY = "rmu_control", "rmu_frozen"


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (`layers` in Llama-style models, `h` in GPT-2-style ones)."""
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"rmu_layer: {type(decoder).__name__} has no list of decoder layers (layers or h)")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the hooked layer."""


def hidden_states(model: nn.Module, batch: LMBatch, layer: int) -> Tensor:
    """[B, T, d] output of decoder layer `layer` itself, captured by a forward hook on that layer (as
    open-unlearning's RMU does). Not `hidden_states[layer + 1]` of an `output_hidden_states` call: for
    the last layer, Hugging Face models return the final norm's output there, not the layer's. The
    forward stops at the hooked layer (the later layers are not run); the hook removes itself on its
    first call, so a gradient-checkpointing recompute of the layer runs without it. The whole model is
    called, not its decoder alone: a sharded model (FSDP) gathers its weights in the root's forward."""
    captured: list[Tensor] = []

    def capture(module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
        handle.remove()
        captured.append(output if isinstance(output, Tensor) else output[0])  # a tuple in transformers 4.x
        raise _Captured

    handle = decoder_layers(model.get_decoder())[layer].register_forward_hook(capture)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"rmu_layer: decoder layer {layer} did not run in the model's forward pass")
    return captured[0]


def masked_mse(h: Tensor, target: Tensor, batch: LMBatch) -> Tensor:
    """Mean over the step's non-padding positions and the hidden dimensions of (h - target)^2; padding
    positions are selected out (torch.where), never multiplied by 0, so a non-finite value there stays out."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    sq = (h.to(dtype) - target.to(dtype)).pow(2).sum(-1)
    sq = torch.where(batch.attention_mask.bool(), sq, torch.zeros((), dtype=dtype, device=sq.device))
    return sq.sum() / (batch.position_norm * h.shape[-1])


def check_layers(model: nn.Module, ctx: ObjectiveContext) -> None:
    n = model.config.num_hidden_layers
    for name, layers in (("rmu_layer", [ctx.cfg.rmu_layer]), ("rmu_update_layers", ctx.cfg.rmu_update_layers)):
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"{name}: layer {bad[0]} does not exist; the model has layers 0..{n - 1}")


def setup(model: nn.Module, ctx: ObjectiveContext, data: SetupData) -> None:
    """Draw the control vector c * u and cache the frozen retain activations."""
    check_layers(model, ctx)
    cfg = ctx.cfg
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "rmu-control"))
    u = torch.rand(model.config.hidden_size, generator=gen, dtype=torch.float64)  # as the reference: rand, normalised
    ctx.cache[CONTROL_KEY] = cfg.rmu_steering * u / u.norm()  # float64; cast to the activations' dtype in use
    if data.retain is None:
        return
    frozen = data.ref_model if data.ref_model is not None else model
    rows, width = data.retain["input_ids"].shape
    cached: Tensor | None = None
    for batch, h in per_sample(frozen, data.retain, partial(hidden_states, layer=cfg.rmu_layer), cfg.batch_size, ctx):
        if cached is None:
            cached = torch.zeros(rows, width, h.shape[-1], dtype=h.dtype)
        cached[batch.index, : h.shape[1]] = h.cpu()
    ctx.cache[FROZEN_KEY] = world().all_sum(cached)  # each rank computed its share of the rows


def forget_loss(model: nn.Module, batch: LMBatch, ctx: ObjectiveContext) -> Tensor:
    h = hidden_states(model, batch, ctx.cfg.rmu_layer)
    return masked_mse(h, ctx.cache[CONTROL_KEY].to(h.device), batch)


def retain_loss(model: nn.Module, batch: LMBatch, ctx: ObjectiveContext) -> Tensor:
    h = hidden_states(model, batch, ctx.cfg.rmu_layer)
    frozen = ctx.cache[FROZEN_KEY][batch.index.cpu(), : h.shape[1]].to(h.device)
    return masked_mse(h, frozen, batch)


def trainable(name: str, cfg) -> bool:
    """Parameters named like `layers.<i>.<one of rmu_params>` for i in rmu_update_layers."""
    in_layer = any(f"layers.{i}." in name for i in cfg.rmu_update_layers)
    return in_layer and any(p in name for p in cfg.rmu_params)


OBJECTIVES.register("rmu")(Objective(forget=forget_loss, retain=retain_loss, setup=setup, trainable=trainable))
