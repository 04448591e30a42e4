"""SAF and MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free"; reference code
AngusDujw/SAF): sharpness-aware training at the cost of the base optimizer, by adding to the loss
at w the trajectory loss

    L_tra = tau^2 * (1/|B|) sum_i KL(softmax(z_old_i / tau) || softmax(z_i / tau)),   L = L_CE + lam * L_tra,

where z_i are the example's logits now and z_old_i a past output for it (constants):
- SAF: the example's own logits from E~ visits ago (E~ epochs ago when each epoch visits every
  example once), kept in a host ring buffer of shape (N, E~ + 1, C) indexed by the example's
  position in the training set (`Batch.index`, which travels with the example; the reference
  code pairs a batch with the next batch's indices). The term starts for an example once the
  buffer holds its output from E~ visits ago and it has been visited `start_epoch` times.
  One forward and one backward per step.
- MESA: the logits of an exponential moving average of the model (parameters and buffers, decay
  beta, updated after each optimizer step, kept in eval mode as timm's ModelEmaV2 that the
  reference code uses), one extra forward without gradient.

We follow the code where it and the paper differ (SEED_METHODS.md 2a): lam is applied once and the
KL is multiplied by tau^2 (the paper's Eq. 8 has no tau^2 and Alg. 1 adds lam twice).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from shared.sam.base import BaseOptimizerSpec, wrap_base
from shared.sam.member import (
    Batch,
    Member,
    ModelCopy,
    forward_logits,
    model_tensors,
    split_member_state,
    with_member_state,
)
from shared.validate import check_nonnegative, check_positive, check_range

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def trajectory_loss(logits: Tensor, past: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """tau^2 * (1/B) * sum over the examples (those in `mask`) of KL(softmax(past/tau) || softmax(logits/tau)),
    computed in float32 or wider; the gradient flows through `logits` only."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype).reshape(-1, logits.shape[-1]) / tau
    old = past.detach().to(device=z.device, dtype=dtype).reshape(z.shape) / tau
    per_example = F.kl_div(F.log_softmax(z, -1), F.log_softmax(old, -1), log_target=True, reduction="none").sum(-1)
    if mask is not None:
        per_example = per_example * mask.to(device=z.device, dtype=dtype)
    return tau * tau * per_example.mean()


class TrajectoryMember(Member, Optimizer):
    """A base optimizer whose loss gains lam * L_tra against targets that a subclass provides
    (`_targets`). It shares the base optimizer's parameter groups (LR schedulers drive it) and its
    state_dict is the base optimizer's plus the member's own state."""

    driver_only: ClassVar[bool] = True
    passes: ClassVar[tuple[int, int]] = (1, 0)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], base_optimizer: BaseOptimizerSpec,
                 lam: float, tau: float, **base_kwargs: Any) -> None:
        check_nonnegative("lam", lam)
        check_positive("tau", tau)
        self.lam, self.tau = lam, tau
        super().__init__(params, {})
        self.base_optimizer = wrap_base(self, base_optimizer, base_kwargs)

    def _targets(self, model: nn.Module, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor | None] | None:
        """(past logits, mask of the examples that have one or None for all) or None: no term."""
        raise NotImplementedError

    def extra_loss(self, model: nn.Module, logits: Tensor, batch: Batch) -> Tensor | None:
        found = self._targets(model, logits, batch)
        if found is None or self.lam == 0:
            return None
        return self.lam * trajectory_loss(logits, found[0], self.tau, found[1])

    @torch.no_grad()
    def _after_step(self) -> None:
        """Called after each base optimizer step."""

    def step(self, closure: Any = None) -> Any:
        loss = self.base_optimizer.step(closure)
        self._after_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return with_member_state(self, self.base_optimizer.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(split_member_state(self, state_dict))
        self.param_groups = self.base_optimizer.param_groups

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, tau={self.tau}, base={self.base_optimizer!r})"


class SAF(TrajectoryMember):
    """SAF: lam (paper 0.3), tau (5), `past` = E~ (paper 3, its ImageNet script 2), `start_epoch`
    (the visit from which the term applies, >= past; paper 5), `end_epoch` (None: never ends),
    `bank_dtype` ("float32" or "float16", which halves the buffer), `num_examples` (N; None: the
    buffer grows to the largest index seen, during the first epoch only). Needs `Batch.index`."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        lam: float = 0.3,
        tau: float = 5.0,
        past: int = 3,
        start_epoch: int = 5,
        end_epoch: int | None = None,
        bank_dtype: str = "float32",
        num_examples: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(past, int) or past < 1:
            raise ValueError(f"past: expected an integer >= 1 (E~, the epochs between an output and its use), got {past!r}")
        if not isinstance(start_epoch, int) or start_epoch < past:
            raise ValueError(f"start_epoch: expected an integer >= past ({past}): before that the buffer holds no "
                             f"output from {past} epochs ago; got {start_epoch!r}")
        if end_epoch is not None and (not isinstance(end_epoch, int) or end_epoch <= start_epoch):
            raise ValueError(f"end_epoch: expected an integer > start_epoch ({start_epoch}) or null, got {end_epoch!r}")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype: expected one of {', '.join(BANK_DTYPES)}, got {bank_dtype!r}")
        if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
            raise ValueError(f"num_examples: expected an integer >= 1 or null, got {num_examples!r}")
        self.past, self.start_epoch, self.end_epoch = past, start_epoch, end_epoch
        self.bank_dtype = BANK_DTYPES[bank_dtype]
        self._bank: Tensor | None = None  # (N, past + 1, C) past logits, on the host
        self._visits = torch.zeros(num_examples or 0, dtype=torch.int64)  # times each example was seen
        self._num_examples = num_examples
        super().__init__(params, base_optimizer, lam, tau, **kwargs)

    @property
    def bank_bytes(self) -> int:
        """The size of the output buffer in bytes (0 before the first step)."""
        return 0 if self._bank is None else self._bank.numel() * self._bank.element_size()

    def _ensure(self, n: int, num_classes: int) -> None:
        """A buffer for at least n examples. Without `num_examples` it grows to the largest index
        seen, which in shuffled order happens a few times (about log N) in the first epoch only."""
        if self._bank is not None and self._bank.shape[2] != num_classes:
            raise ValueError(f"SAF: the logits have {num_classes} classes but the buffer was made for "
                             f"{self._bank.shape[2]}")
        if self._num_examples is not None and n > self._num_examples:
            raise ValueError(f"index: {n - 1} is out of range for num_examples={self._num_examples}")
        size = 0 if self._bank is None else self._bank.shape[0]
        if n <= size:
            return
        new = self._num_examples or n
        bank = torch.zeros(new, self.past + 1, num_classes, dtype=self.bank_dtype)
        visits = torch.zeros(new, dtype=torch.int64)
        if self._bank is not None:
            bank[:size] = self._bank
        visits[: len(self._visits)] = self._visits
        self._bank, self._visits = bank, visits

    def _targets(self, model: nn.Module, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor | None] | None:
        if batch.index is None:
            raise ValueError("index: SAF keeps each example's past outputs, so every batch needs the examples' "
                             "positions in the training set: pass shared.Batch(inputs, targets, index)")
        idx = batch.index.reshape(-1).to("cpu", torch.int64)
        z = logits.detach().reshape(len(idx), -1)
        if not len(idx):
            return None
        low, high = (int(v) for v in torch.aminmax(idx))
        if low < 0:
            raise ValueError(f"index: expected positions >= 0, got {low}")
        if len(torch.unique(idx)) != len(idx):
            raise ValueError("index: an example appears twice in one batch; its past outputs would collide")
        self._ensure(high + 1, z.shape[1])
        visit = self._visits[idx]
        slots = self.past + 1
        active = visit >= self.start_epoch
        if self.end_epoch is not None:
            active &= visit < self.end_epoch
        n_active = int(active.sum())
        target = self._bank[idx, (visit - self.past) % slots] if n_active else None
        self._bank[idx, visit % slots] = z.to("cpu", self.bank_dtype)
        self._visits[idx] += 1
        if target is None:
            return None
        return target, (None if n_active == len(idx) else active)

    def member_state(self) -> dict[str, Any]:
        if self._bank is None:
            return {}
        return {"bank": self._bank.clone(), "visits": self._visits.clone()}

    def load_member_state(self, state: dict[str, Any]) -> None:
        if "bank" in state:
            self._bank = state["bank"].to(self.bank_dtype).clone()
            self._visits = state["visits"].to(torch.int64).clone()


class MESA(TrajectoryMember):
    """MESA: lam (paper 0.8), tau (5), beta (the EMA decay; timm's 0.9998 suits ImageNet's long runs,
    short runs need a shorter memory), `start_step` (optimizer steps before the term applies)."""

    passes: ClassVar[tuple[int, int]] = (1, 1)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        lam: float = 0.8,
        tau: float = 5.0,
        beta: float = 0.999,
        start_step: int = 0,
        **kwargs: Any,
    ) -> None:
        check_range("beta", beta, 0.0, 1.0 - 1e-12)
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected an integer >= 0, got {start_step!r}")
        self.beta, self.start_step = beta, start_step
        self._ema = ModelCopy(eval_mode=True)
        self._model: nn.Module | None = None
        self._steps = 0
        super().__init__(params, base_optimizer, lam, tau, **kwargs)

    def bind(self, model: nn.Module) -> None:
        self._model = model
        self._ema.ensure(model)

    @torch.no_grad()
    def _targets(self, model: nn.Module, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor | None] | None:
        if self._steps < self.start_step:
            return None
        return forward_logits(self._ema.module, batch.inputs), None

    @torch.no_grad()
    def _after_step(self) -> None:
        self._steps += 1
        if self._ema.module is None:
            return
        ema_float, model_float, ema_other, model_other = self._ema.pairs(self._model)
        torch._foreach_lerp_(ema_float, model_float, 1.0 - self.beta)  # v <- beta v + (1 - beta) w
        if ema_other:
            torch._foreach_copy_(ema_other, model_other)  # e.g. num_batches_tracked

    @property
    def ema_bytes(self) -> int:
        """The size of the EMA model (parameters and buffers) in bytes."""
        module = self._ema.module
        return 0 if module is None else sum(t.numel() * t.element_size() for t in model_tensors(module))

    def member_state(self) -> dict[str, Any]:
        state = self._ema.state()
        return {"steps": self._steps, **({} if state is None else {"ema": state})}

    def load_member_state(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
        if "ema" in state:
            self._ema.load(state["ema"])

