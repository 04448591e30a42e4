"""Weight averaging (Fan et al. 2025): a running mean of the weights taken every `wa_every`
steps from step `wa_start` on, swapped in after the last step (kept in float32 or wider; of
sharded parameters, per local shard)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from shared.sam.shards import local, locals_, shard_like, whole
from unlearn.smoothers.base import SMOOTHERS, Smoother


@SMOOTHERS.register("wa")
class WeightAveraging(Smoother):
    avg: list[Tensor] | None = None
    count: int = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        start, every = self.cfg.wa_start, self.cfg.wa_every
        if step < start or (step - start) % every:
            return
        self.count += 1
        if self.avg is None:
            self.avg = [local(p).detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for p in self.params]
        else:  # avg += (w - avg) / count
            torch._foreach_lerp_(self.avg, [local(p).to(a.dtype) for p, a in zip(self.params, self.avg)],
                                 1 / self.count)

    @torch.no_grad()
    def finish(self) -> None:
        # `unlearn` checks before training that at least one average is taken (steps >= wa_start)
        torch._foreach_copy_(locals_(self.params), self.avg)

    @contextlib.contextmanager
    def delivered(self) -> Iterator[None]:
        """The average so far in place of the weights (a run that ended here would deliver it)."""
        if self.avg is None:
            yield
            return
        weights = locals_(self.params)
        with torch.no_grad():
            kept = [w.clone() for w in weights]
            torch._foreach_copy_(weights, self.avg)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, kept)

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors (gathered where the parameters are sharded), so a checkpoint resumes on
        any number of processes."""
        avg = None if self.avg is None else [whole(a, p) for a, p in zip(self.avg, self.params)]
        return {"avg": avg, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        avg = state["avg"]
        self.avg = None if avg is None else [shard_like(a, p) for a, p in zip(avg, self.params)]
        self.count = state["count"]
