"""TRAM, trust region aware minimization (Sherborne et al., ICLR 2024, "TRAM: Bridging Trust Regions
and Sharpness Aware Minimization"; reference code tomsherborne/tram_optimizer).

ASAM whose radius is, every step, the trust-region distance measured on the batch:
    d = KL(p_target || p(x; w)),  averaged over the examples (`batchmean`)
    e = d * T^2 g / ||T g||,      T = |w| + eta (eta = 0: the paper's Eq. 7, w^2 g / ||w g||)
with the target
- `tram-prev`: the previous step's model w_{t-1} (Eq. 4; on the first step the model itself, d = 0),
- `tram-init`: the model as it was at the first step (the pre-trained model), frozen,
- `tram-x`:    the same model on noised inputs, x + N(0, sigma^2) (Eq. 5; on the input embeddings
               for a model with `get_input_embeddings()` fed token ids).
Three forwards (the first pass, the target's, the one at w + e) and two backwards.

Where we differ from the reference code, and why (SEED_METHODS.md 1e): e follows Eq. 7 (the code
multiplies a tensor of ones and never uses the gradient); d is a mean over examples (the code's
`kl.py` divides by B^2 C, so its radius depends on the batch size and the number of classes);
the noised forward does not touch the caller's inputs (the code pops `input_ids` from them).
The target runs as the first pass does (training mode, batch-norm statistics frozen), so equal
weights give d = 0; an eval-mode copy would measure the train/eval gap of batch norm instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.sam.base import BaseOptimizerSpec, SharpnessAware
from shared.sam.bn import frozen_bn_stats
from shared.sam.member import Batch, ModelCopy, forward_logits
from shared.validate import check_nonnegative, check_positive

TARGETS = ("prev", "init", "x")


def trust_region_distance(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(logits)) summed over classes, averaged over the examples (every
    position of a sequence counts as one), in float32 or wider; no gradient."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.detach().to(dtype).reshape(-1, logits.shape[-1])
    t = target_logits.detach().to(dtype).reshape(-1, logits.shape[-1])
    return F.kl_div(F.log_softmax(z, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")


class TRAM(SharpnessAware):
    """TRAM over `base_optimizer`; `target` is "prev", "init" or "x" (then `sigma` > 0 is the noise's
    standard deviation). There is no rho: the radius is d. The paper assumes d stays below ASAM's
    radius and does not clip it; `max_radius` (None: no cap, the paper) caps it, for learning rates
    at which consecutive models differ by more than a trust region (d of several nats perturbs
    every weight by several times itself). Needs `shared.member_backward`."""

    driver_only: ClassVar[bool] = True
    batchable: ClassVar[bool] = False  # the trust-region radius comes from one model's output divergence
    shardable: ClassVar[bool] = False  # its target model is a whole copy of the model
    passes: ClassVar[tuple[int, int]] = (2, 1)
    default_target: ClassVar[str] = "prev"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        target: str | None = None,
        sigma: float = 0.01,
        eta: float = 0.0,
        max_radius: float | None = None,
        **kwargs: Any,
    ) -> None:
        target = self.default_target if target is None else target
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
        check_positive("sigma", sigma)
        check_nonnegative("eta", eta)
        if max_radius is not None:
            check_positive("max_radius", max_radius)
        if "rho" in kwargs:
            raise ValueError("rho: TRAM has no rho; its radius is the trust-region distance d of each batch")
        self.target, self.sigma, self.max_radius = target, sigma, max_radius
        self._teacher = ModelCopy()  # tram-prev / tram-init: the target model
        self._d_sum: Tensor | None = None  # sum of d over the first passes since the last first_step
        self._d_count = 0
        self._radius: Tensor | None = None
        self._model: nn.Module | None = None
        super().__init__(params, base_optimizer, rho=1.0, adaptive=True, eta=eta, **kwargs)

    # ------------------------------------------------------------------ hooks of the contract
    def bind(self, model: nn.Module) -> None:
        self._model = model
        if self.target != "x":
            self._teacher.ensure(model)

    @torch.no_grad()
    def observe(self, model: nn.Module, logits: Tensor, batch: Batch) -> None:
        if self.target == "x":
            with frozen_bn_stats(model):
                target_logits = forward_logits(model, _noised(model, batch.inputs, self.sigma))
        else:
            teacher = self._teacher.module
            if teacher is None:
                raise RuntimeError("TRAM: no model bound; train it through shared.member_backward")
            if teacher.training != model.training:
                teacher.train(model.training)
            with frozen_bn_stats(teacher):
                target_logits = forward_logits(teacher, batch.inputs)
        d = trust_region_distance(target_logits, logits)
        self._d_sum = d if self._d_sum is None else self._d_sum + d
        self._d_count += 1

    # ------------------------------------------------------------------ the radius and the target
    def first_step(self, zero_grad: bool = False) -> None:
        if self._d_sum is None:
            raise RuntimeError("TRAM: no first pass was observed, so there is no radius; train through "
                               "shared.member_backward(opt, model, batches)")
        self._radius = self._d_sum / self._d_count
        if self.max_radius is not None:
            self._radius = self._radius.clamp(max=self.max_radius)
        self._d_sum, self._d_count = None, 0
        super().first_step(zero_grad)

    def _rho(self, group: dict[str, Any]) -> Tensor:  # type: ignore[override]
        return self._radius

    @property
    def last_radius(self) -> Tensor | None:
        """d of the last perturbation (a detached tensor)."""
        return self._radius

    def _base_step(self) -> None:
        if self._plan is not None:
            self.unperturb()
        if self.target == "prev" and self._teacher.module is not None:  # w_t becomes the next step's w_{t-1}
            target, model, target_other, model_other = self._teacher.pairs(self._model)
            with torch.no_grad():
                torch._foreach_copy_(target + target_other, model + model_other)
        super()._base_step()

    def metrics(self) -> dict[str, float]:
        return {} if self._radius is None else {"tram_radius": float(self._radius)}

    # ------------------------------------------------------------------ state
    def member_state(self) -> dict[str, Any]:
        state = self._teacher.state()
        return {} if state is None else {"target": state}

    def load_member_state(self, state: dict[str, Any]) -> None:
        if "target" in state:
            self._teacher.load(state["target"])


def _noised(model: nn.Module, inputs: Any, sigma: float) -> Any:
    """The inputs plus N(0, sigma^2): the model's own `noised_inputs(inputs, sigma)` if it has one
    (keyword inputs for packed token inputs, e.g. `testbeds.text_models`), else float tensors
    directly and token ids through the model's input embeddings (as `inputs_embeds`); the caller's
    inputs are left as they are."""
    if hasattr(model, "noised_inputs"):
        return model.noised_inputs(inputs, sigma)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if isinstance(ids, Tensor) and ids.is_floating_point():
        noised = ids + sigma * torch.randn_like(ids)
        return {**inputs, "input_ids": noised} if isinstance(inputs, Mapping) else noised
    embed = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, Tensor) or embed is None or embed() is None:
        raise ValueError("sigma: tram-x noises the model's input, but this model takes integer inputs and has no "
                         "get_input_embeddings() to noise instead; use tram-prev or tram-init")
    embeds = embed()(ids).detach()
    embeds = embeds + sigma * torch.randn_like(embeds)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"} if isinstance(inputs, Mapping) else {}
    return {**rest, "inputs_embeds": embeds}


class TRAMPrev(TRAM):
    """tram-prev: the target is the previous step's model."""

    default_target: ClassVar[str] = "prev"


class TRAMInit(TRAM):
    """tram-init: the target is the model at the first step, frozen."""

    default_target: ClassVar[str] = "init"


class TRAMX(TRAM):
    """tram-x: the target is the same model on noised inputs (sigma)."""

    default_target: ClassVar[str] = "x"
