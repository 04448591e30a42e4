"""Negative Preference Optimization (Zhang et al. 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning"):

    l_f = -(2 / beta) * E[log sigmoid(-beta * (log p_theta(y|x) - log p_ref(y|x)))]

per sequence (sum of token log-probs, padding masked). The reference log-probs are computed once
before training and cached by sample index: no second model in memory, no recomputation per
step. With gamma > 0 the retain NLL is added (NPO + RT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import LMBatch
from unlearn.distributed import world
from unlearn.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveContext,
    SetupData,
    nll_loss,
    per_sample,
    seq_mean,
    sequence_logprob,
)

REF_KEY = "npo_ref_logp"


def setup(model: nn.Module, ctx: ObjectiveContext, data: SetupData) -> None:
    """Cache log p_ref(y|x) of every forget sample, from `data.ref_model` or else the model as it
    is before the first step."""
    ref = data.ref_model if data.ref_model is not None else model
    values = torch.zeros(len(data.forget["input_ids"]), dtype=torch.float64)  # zeros: ranks sum their rows
    for batch, logp in per_sample(ref, data.forget, sequence_logprob, ctx.cfg.batch_size, ctx):
        values[batch.index] = logp.double().cpu()
    ctx.cache[REF_KEY] = world().all_sum(values)  # each rank computed its share of the rows


def npo_loss(model: nn.Module, batch: LMBatch, ctx: ObjectiveContext) -> Tensor:
    beta = ctx.cfg.beta
    logp = sequence_logprob(model, batch)
    log_ratio = logp - ctx.cache[REF_KEY][batch.index.cpu()].to(device=logp.device, dtype=logp.dtype)
    return seq_mean(-(2 / beta) * F.logsigmoid(-beta * log_ratio), batch)


OBJECTIVES.register("npo")(Objective(forget=npo_loss, retain=nll_loss, setup=setup))
