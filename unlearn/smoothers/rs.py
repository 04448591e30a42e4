"""Randomized smoothing of the forget loss (Fan et al. 2025): the forget gradient is averaged over
`rs_samples` Gaussian perturbations of the weights, w + n, n ~ N(0, sigma^2 I):

    grad = (1/S) sum_s grad l_f(w + n_s) + gamma * grad l_r(w).

The noise is added in place and the weights are copied back from a backup (restored bit for bit,
no model copy); each step's noise comes from a generator seeded by (seed, step), so a resumed run
draws the same noise. Sharded (FSDP2) parameters get the same noise as on one process: every rank
draws each parameter's whole noise tensor and adds its own shard of it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from shared.sam.shards import local, locals_, shard_like
from shared.seeding import derive_seed
from unlearn.smoothers.base import SMOOTHERS, Pair, Smoother, StepTerms, accumulate


@SMOOTHERS.register("rs")
class RandomizedSmoother(Smoother):
    def make_optimizer(self, params: list[Tensor]) -> Optimizer:
        opt = super().make_optimizer(params)
        self._backup = [torch.empty_like(local(p)) for p in params]
        return opt

    def backward(self, opt: Optimizer, micro_batches: Sequence[Pair], terms: StepTerms, step: int) -> dict[str, Tensor]:
        opt.zero_grad()
        samples, sigma = self.cfg.rs_samples, self.cfg.sigma
        gen = torch.Generator(device=self.params[0].device).manual_seed(derive_seed(self.cfg.seed, "rs", step))
        with torch.no_grad():
            torch._foreach_copy_(self._backup, locals_(self.params))
        total = None
        for _ in range(samples):
            with torch.no_grad():
                for p in self.params:
                    noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                    local(p).add_(shard_like(noise, p), alpha=sigma)
            loss = accumulate(terms.forget, micro_batches, 1 / samples)
            total = loss if total is None else total + loss
            with torch.no_grad():
                torch._foreach_copy_(locals_(self.params), self._backup)
        return self._add_retain({"forget_loss": total / samples}, micro_batches, terms)
