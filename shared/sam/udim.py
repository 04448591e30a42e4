"""UDIM, unknown domain inconsistency minimization (Shin et al., ICLR 2024, "Unknown Domain Inconsistency
Minimization for Domain Generalization"; reference code aailabkaist/UDIM, `IADA_FINAL`).

SAM on the source batch (x, y), plus lam times the gradient at w of an inconsistency loss between the
source and an "unknown domain" x~ made by perturbing the inputs (SEED_METHODS.md 3a, the code's
pixel path):
1. L_x = CE(f_w(x), y) + rho_s * ||grad_w CE(f_w(x), y)||_2  (a double backward), d = grad_x L_x;
2. x~_i = x_i + rho_x * d_i / ||d_i||, normalised per example;
3. G_i, G~_i: per-example gradients of CE with respect to the classifier's weight and bias (the head,
   an nn.Linear) on the forward of [x; x~], kept differentiable with respect to the whole network;
4. with m = mean_i G_i, v_src = mean_i (G_i - m)^2, v_syn = mean_i (G~_i - m)^2, v = (v_src + v_syn) / 2:
       R_var  = 1/2 * sum_{d in src, syn} mean_k (v_d,k - v_k)^2   (k over the head's W and b together)
       R_norm = sum_{P in W, b} mean_i ||G~_i,P||^2 / dim(P)
       L_inc  = R_var + R_norm,  and the step's gradient is g_SAM + lam * grad_w L_inc.
The term is the driver's anchor (`Member.anchor_loss`): evaluated at w after the SAM passes, with
batch-norm running statistics frozen. `warmup_steps` plain SAM steps come first (the code's SAM
warm-up phase; it also reloads the warm-up's best-validation checkpoint, which is the training
loop's business, not the optimizer's). The loss is cross-entropy whatever the driver's criterion,
and the logits must be the head's output.

Where we differ from the reference code, and why (SEED_METHODS.md 3e):
- x~ is normalised per example (defect 3): the code's `F.normalize(grad, dim=0)` normalises each
  pixel across the batch, so an example's step depends on the rest of its batch.
- Batch norm is left as it is (defect 4): the code's `replace_all_batch_norm_modules_` deletes the
  running statistics, so its evaluation then uses test-batch statistics. Here the extra forwards
  normalise with their batch's statistics (training mode) and update no running statistic.
- Kept as in the code (defect 5): v_syn is centred on the source mean, not on its own.
- Not built: the debug-image writing that crashes the code's pixel path (defect 1), the style
  path (`--advstyle`, which perturbs nothing: defect 2) and the multi-source mode (L_inc summed
  over source-domain chunks of the batch): single-source, as both of the code's PACS scripts run.
R_var's mean runs over the head's weight and bias concatenated, as the code's `l2_between_dicts`
(not a sum over the two tensors of their own means, which would weigh the C biases as much as
the C x D weights).

Cost per step over SAM's two passes: a forward and a double backward for x~, a forward on 2B
examples and the backward of L_inc through it (second order through the head's input). Measured on
the digits CNN (`shared.models.DigitsCNN`, batch 64, CPU): a step costs about 4.5x SAM's and 8-9x
SGD's with one thread (4.4x and 6.8x with two), half of the extra in x~'s double backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.sam.base import BaseOptimizerSpec
from shared.sam.bn import frozen_bn_stats
from shared.sam.member import Batch, forward_logits
from shared.sam.sam import SAM
from shared.validate import check_nonnegative, check_positive


def find_head(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The classifier: the Linear module `name` of `model.named_modules()`, or the last Linear (None)."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("head: UDIM takes its per-example gradients at the classifier, an nn.Linear, "
                         f"but this {type(model).__name__} has no Linear module")
    if name is None:
        return modules[linears[-1]]
    if name not in linears:
        raise ValueError(f"head: {name!r} is not a Linear module of the model. Linear modules: "
                         f"{', '.join(repr(n) for n in linears)}")
    return modules[name]


def perturbed_inputs(model: nn.Module, x: Tensor, y: Tensor, rho_x: float, rho_s: float) -> Tensor:
    """x~ = x + rho_x * d_i / ||d_i|| (per example), d = grad_x [CE(f(x), y) + rho_s ||grad_w CE||_2] over
    the parameters that require grad; detached, `x` left as it is, running statistics not updated."""
    x_r = x.detach().requires_grad_()
    with torch.enable_grad(), frozen_bn_stats(model):
        loss = F.cross_entropy(forward_logits(model, x_r), y)
        if rho_s:
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
            loss = loss + rho_s * torch.linalg.vector_norm(torch.stack(norms))
        (d,) = torch.autograd.grad(loss, x_r)
    step = F.normalize(d.reshape(len(d), -1), dim=1).reshape(d.shape)
    return (x.detach() + rho_x * step.to(x.dtype)).detach()


def per_example_head_grads(head: nn.Linear, h: Tensor, targets: Tensor) -> list[Tensor]:
    """For each parameter of `head` (weight, then bias), the gradients of CE(head(h_i), y_i) per
    example, flattened to (N, dim P), differentiable with respect to `h` and to the head.

    torch.func (functional_call + vmap(grad)) rather than BackPACK, the reference's library:
    torch.func ships with torch and composes with autograd (the per-example gradients are
    differentiated again by L_inc's backward), while BackPACK does not support second-order use
    through every layer and is not installed here."""
    params = dict(head.named_parameters())

    def example_loss(p: dict[str, Tensor], h_i: Tensor, y_i: Tensor) -> Tensor:
        z = torch.func.functional_call(head, p, (h_i.unsqueeze(0),))
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y_i.reshape(-1))

    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, h, targets)
    return [grads[name].reshape(len(h), -1) for name in params]


def inconsistency_terms(source: Sequence[Tensor], synthetic: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(R_var, R_norm) from per-example gradients (B, dim P) per head parameter P, on the source and
    on the perturbed batch, in float32 or wider."""
    dtype = torch.promote_types(source[0].dtype, torch.float32)
    v_src, v_syn, r_norm = [], [], []
    for g, g_syn in zip(source, synthetic):
        g, g_syn = g.to(dtype), g_syn.to(dtype)
        mean = g.mean(0)
        v_src.append((g - mean).pow(2).mean(0))
        v_syn.append((g_syn - mean).pow(2).mean(0))  # centred on the source mean, as the code
        r_norm.append(g_syn.pow(2).sum(1).mean() / g.shape[1])
    variances = [torch.cat(v_src), torch.cat(v_syn)]
    middle = (variances[0] + variances[1]) / 2
    r_var = sum((v - middle).pow(2).mean() for v in variances) / 2
    return r_var, torch.stack(r_norm).sum()


class UDIM(SAM):
    """UDIM over `base_optimizer`: SAM (`rho`, e = rho g / ||g||) plus lam * grad L_inc at w.
    `rho_x` (> 0) is the input step (code 0.005; its PACS scripts 10), `rho_s` (>= 0) weighs ||g|| in
    the input objective (None: rho, as the code; a rho schedule does not move it), `lam` (> 0) the
    term (code 0.5, PACS 1), `warmup_steps` the plain SAM steps first, `head` the classifier's name in
    `model.named_modules()` (None: the last nn.Linear). The inputs must be one floating tensor.
    Needs `shared.member_backward`."""

    driver_only: ClassVar[bool] = True
    batchable: ClassVar[bool] = False  # the per-example head gradients are taken on one model
    shardable: ClassVar[bool] = False  # the per-example head gradients need the whole head

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        rho_x: float = 0.005,
        rho_s: float | None = None,
        lam: float = 0.5,
        warmup_steps: int = 0,
        head: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive("rho_x", rho_x)
        if rho_s is not None:
            check_nonnegative("rho_s", rho_s)
        check_positive("lam", lam)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"head: expected the name of a Linear module of the model or null, got {head!r}")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.rho_x, self.lam, self.warmup_steps, self.head = float(rho_x), float(lam), warmup_steps, head
        self.rho_s = float(rho if rho_s is None else rho_s)
        self._model: nn.Module | None = None
        self._head: nn.Linear | None = None
        self._head_name = ""
        self._steps = 0  # optimizer steps taken (warm-up included)

    # ------------------------------------------------------------------ hooks of the contract
    def bind(self, model: nn.Module) -> None:
        if model is not self._model:
            self._head = find_head(model, self.head)
            self._head_name = next(n for n, m in model.named_modules() if m is self._head)
            self._model = model

    def anchor_loss(self, model: nn.Module, batch: Batch) -> Tensor | None:  # type: ignore[override]
        """lam * L_inc on this micro-batch at w; None during the warm-up."""
        if self._steps < self.warmup_steps:
            return None
        x, y = batch.inputs, batch.targets
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise ValueError(f"rho_x: UDIM perturbs the inputs, which must be one floating tensor "
                             f"(images, features), not {got} (e.g. token ids)")
        self.bind(model)
        head = self._head
        x_tilde = perturbed_inputs(model, x, y, self.rho_x, self.rho_s)
        captured: list[tuple[Tensor, Tensor]] = []
        handle = head.register_forward_hook(lambda _module, args, out: captured.append((args[0], out)))
        try:
            with frozen_bn_stats(model):
                logits = forward_logits(model, torch.cat([x.detach(), x_tilde]))
        finally:
            handle.remove()
        n = len(x)
        if len(captured) != 1 or captured[0][1].shape != logits.shape or len(captured[0][0]) != 2 * n:
            raise ValueError(f"head: UDIM takes the logits to be the output of the head ({self._head_name!r}) applied "
                             "once to the whole batch; name the classifier with `head`")
        grads = per_example_head_grads(head, captured[0][0], torch.cat([y, y]))
        r_var, r_norm = inconsistency_terms([g[:n] for g in grads], [g[n:] for g in grads])
        return self.lam * (r_var + r_norm)

    def _base_step(self) -> None:
        super()._base_step()
        self._steps += 1

    # ------------------------------------------------------------------ state
    def member_state(self) -> dict[str, Any]:
        return {"steps": self._steps}

    def load_member_state(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
