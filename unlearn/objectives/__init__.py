"""Unlearning objectives, one module each, registered by name in OBJECTIVES: nll (fine-tuning),
ga, graddiff, npo, simnpo, rmu. Each is a forget loss and an optional retain loss, plain functions
`(model, batch, ctx) -> loss`; the training loop combines them as l_f + gamma * l_r."""

from unlearn.objectives import ga, nll, npo, rmu, simnpo  # noqa: F401  (importing registers them)
from unlearn.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveContext,
    SetupData,
    nll_loss,
    seq_mean,
    sequence_logprob,
    token_logprobs,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveContext",
    "SetupData",
    "nll_loss",
    "seq_mean",
    "sequence_logprob",
    "token_logprobs",
]
