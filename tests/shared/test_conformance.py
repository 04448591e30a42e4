"""Conformance: every member of `shared.OPTIMIZERS` passes the same checks (pytorch_optimizer style).

Each member is described once in `MEMBERS` by its paper's formula, written here in plain float64
per-tensor code: the gradient that sets the perturbation, the perturbation e, the descent direction
at w + e, and rho's schedule. Every test is driven by that table, so a new member is covered by
adding one row (`test_table_covers_the_registry` fails until it is added). The base optimizers
(SGD with momentum and weight decay, AdamW) are written by hand as well.

Papers: SAM (Foret et al., ICLR 2021), ASAM (Kwon et al., ICML 2021), GSAM (Zhuang et al., ICLR
2022), OBF (Vani et al., ICML 2024, "Forget Sharpness").
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import OPTIMIZERS, SharpnessAware, sam_backward

NAMES = [name for name in OPTIMIZERS.names() if not OPTIMIZERS.get(name).driver_only]  # the others: test_driver_members
EPS = 1e-12  # the implementation's eps: e = rho g / (||g|| + eps), GSAM: ||g_p||^2 + eps
ATOL = 1e-10  # float64 agreement with the references
IN, HIDDEN, CLASSES, BATCH = 5, 7, 4, 8

Grads = list[Tensor]
Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- the tiny model
class Net(nn.Module):
    """Linear-tanh-Linear; `functional` below is the same map on a plain list of tensors."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, CLASSES, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def functional(ws: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = ws
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def make_batches(n: int, size: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float64) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, IN, generator=gen, dtype=torch.float64).to(dtype),
            torch.randint(0, CLASSES, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def split(batch: Batch, k: int) -> list[Batch]:
    x, y = batch
    return list(zip(x.chunk(k), y.chunk(k)))


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- float64 references
def leaves(ws: list[Tensor]) -> list[Tensor]:
    return [w.detach().clone().requires_grad_(True) for w in ws]


def ce_grads(ws: list[Tensor], batch: Batch) -> Grads:
    """grad of the mean cross-entropy at ws."""
    x, y = batch
    ws = leaves(ws)
    return list(torch.autograd.grad(F.cross_entropy(functional(ws, x), y), ws))


def obf_grads(ws: list[Tensor], batch: Batch, *, gamma: float, C: float | None = None, sigmoid: bool = True) -> Grads:
    """OBF's ascent gradient: back-propagate d/dlogits = (u - (a p + (1 - a) onehot(y))) / B with
    a = gamma max(0, (1 - lam / p_y) / (1 - lam)), lam = 1 / C, p and a held constant."""
    x, y = batch
    ws = leaves(ws)
    logits = functional(ws, x)
    z = logits.detach()
    batch_size, num_classes = z.shape
    p = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=-1)
    C = num_classes if C is None else C
    onehot = torch.zeros_like(z)
    onehot[torch.arange(batch_size), y] = 1.0
    rows = []
    for i in range(batch_size):
        if C > 0:
            lam = 1.0 / C
            a = gamma * max(0.0, (1.0 - lam / p[i, y[i]].item()) / (1.0 - lam))
        else:
            a = gamma
        rows.append((1.0 / num_classes - (a * p[i] + (1.0 - a) * onehot[i])) / batch_size)
    return list(torch.autograd.grad(logits, ws, grad_outputs=torch.stack(rows)))


def sq(tensors: list[Tensor]) -> Tensor:
    return sum((t * t).sum() for t in tensors)


def sam_perturbation(ws: list[Tensor], gs: Grads, rhos: list[float], mask: list[bool]) -> list[Tensor]:
    """e = rho g / ||g||, the norm over all perturbed tensors."""
    norm = math.sqrt(sq([g for g, m in zip(gs, mask) if m]))
    return [rho * g / (norm + EPS) if m else torch.zeros_like(g) for g, rho, m in zip(gs, rhos, mask)]


def asam_perturbation(ws: list[Tensor], gs: Grads, rhos: list[float], mask: list[bool], *, eta: float) -> list[Tensor]:
    """T = |w| + eta, e = rho T^2 g / ||T g||."""
    ts = [w.abs() + eta for w in ws]
    norm = math.sqrt(sq([t * g for t, g, m in zip(ts, gs, mask) if m]))
    return [rho * t * t * g / (norm + EPS) if m else torch.zeros_like(g) for t, g, rho, m in zip(ts, gs, rhos, mask)]


def plain_descent(gs: Grads, gps: Grads, mask: list[bool]) -> Grads:
    return gps


def gsam_descent(gs: Grads, gps: Grads, mask: list[bool], *, alpha: float) -> Grads:
    """d = g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p) on the perturbed tensors."""
    dot = sum((g * gp).sum() for g, gp, m in zip(gs, gps, mask) if m)
    ratio = dot / (sq([gp for gp, m in zip(gps, mask) if m]) + EPS)
    return [gp - alpha * (g - ratio * gp) if m else gp for g, gp, m in zip(gs, gps, mask)]


def sagm_perturbation(ws: list[Tensor], gs: Grads, rhos: list[float], mask: list[bool], *, alpha: float
                      ) -> list[Tensor]:
    """SAGM: e = (rho / ||g|| - alpha) g."""
    norm = math.sqrt(sq([g for g, m in zip(gs, mask) if m]))
    return [(rho / (norm + EPS) - alpha) * g if m else torch.zeros_like(g) for g, rho, m in zip(gs, rhos, mask)]


def sagm_descent(gs: Grads, gps: Grads, mask: list[bool]) -> Grads:
    """SAGM: d = (g + g_p) / 2 on the perturbed tensors."""
    return [(g + gp) / 2 if m else gp for g, gp, m in zip(gs, gps, mask)]


def constant_rho(rho: float, lr: float, lr_max: float) -> float:
    return rho


def gsam_rho(rho: float, lr: float, lr_max: float, *, rho_min: float, lr_min: float = 0.0) -> float:
    """rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min)."""
    return rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)


@dataclass(frozen=True)
class Member:
    """One row of the conformance table: constructor options and the paper's formula."""

    rho: float
    options: dict[str, Any] = field(default_factory=dict)
    ascent: Callable[[list[Tensor], Batch], Grads] = ce_grads
    perturbation: Callable[..., list[Tensor]] = sam_perturbation
    descent: Callable[..., Grads] = plain_descent
    rho_at: Callable[[float, float, float], float] = constant_rho


MEMBERS: dict[str, Member] = {
    "sam": Member(rho=0.05),
    "asam": Member(rho=0.5, options={"eta": 0.1}, perturbation=partial(asam_perturbation, eta=0.1)),
    "gsam": Member(
        rho=0.1,
        options={"alpha": 0.3, "rho_min": 0.02},
        descent=partial(gsam_descent, alpha=0.3),
        rho_at=partial(gsam_rho, rho_min=0.02),
    ),
    "obf": Member(rho=0.05, options={"gamma": 0.7}, ascent=partial(obf_grads, gamma=0.7)),
    # alpha large enough that its term shows against rho / ||g|| on the test net
    "sagm": Member(rho=0.05, options={"alpha": 0.02}, perturbation=partial(sagm_perturbation, alpha=0.02),
                   descent=sagm_descent),
    # on a model without LSQ step sizes GAQAT is SAGM (its own part: tests/shared/test_gaqat.py)
    "gaqat": Member(rho=0.05, options={"alpha": 0.02}, perturbation=partial(sagm_perturbation, alpha=0.02),
                    descent=sagm_descent),
}


class RefSGD:
    """d = g + wd w; buf = d (first step), then mu buf + d; w <- w - lr buf."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.momentum, self.weight_decay = momentum, weight_decay
        self.bufs: list[Tensor] | None = None

    def step(self, ws: list[Tensor], ds: Grads, lr: float) -> list[Tensor]:
        ds = [d + self.weight_decay * w for w, d in zip(ws, ds)]
        self.bufs = ds if self.bufs is None else [self.momentum * b + d for b, d in zip(self.bufs, ds)]
        return [w - lr * b for w, b in zip(ws, self.bufs)]


class RefAdamW:
    """Decoupled weight decay, bias-corrected moments (Loshchilov & Hutter)."""

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m: list[Tensor] | None = None
        self.v: list[Tensor] | None = None

    def step(self, ws: list[Tensor], ds: Grads, lr: float) -> list[Tensor]:
        self.t += 1
        if self.m is None:
            self.m = [torch.zeros_like(w) for w in ws]
            self.v = [torch.zeros_like(w) for w in ws]
        self.m = [self.b1 * m + (1 - self.b1) * d for m, d in zip(self.m, ds)]
        self.v = [self.b2 * v + (1 - self.b2) * d * d for v, d in zip(self.v, ds)]
        out = []
        for w, m, v in zip(ws, self.m, self.v):
            m_hat = m / (1 - self.b1**self.t)
            v_hat = v / (1 - self.b2**self.t)
            out.append(w * (1 - lr * self.weight_decay) - lr * m_hat / (v_hat.sqrt() + self.eps))
        return out


@dataclass(frozen=True)
class Base:
    options: dict[str, Any]
    reference: type
    state_keys: tuple[str, ...]  # what its state_dict must carry per parameter


BASES: dict[str, Base] = {
    "sgd": Base({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}, RefSGD, ("momentum_buffer",)),
    "adamw": Base(
        {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}, RefAdamW, ("exp_avg", "exp_avg_sq")
    ),
}


# --------------------------------------------------------------------------- parameter layouts
@dataclass(frozen=True)
class Layout:
    """Parameter groups by index into [w1, b1, w2, b2]: (indices, rho factor, perturb)."""

    groups: tuple[tuple[tuple[int, ...], float | None, bool], ...]

    def torch_groups(self, model: nn.Module, rho: float) -> list[dict[str, Any]]:
        params = list(model.parameters())
        out = []
        for indices, factor, perturb in self.groups:
            group: dict[str, Any] = {"params": [params[i] for i in indices]}
            if factor is not None:
                group["rho"] = rho * factor
            if not perturb:
                group["perturb"] = False
            out.append(group)
        return out

    def per_tensor(self, rho: float) -> tuple[list[float], list[bool]]:
        rhos, mask = [0.0] * 4, [False] * 4
        for indices, factor, perturb in self.groups:
            for i in indices:
                rhos[i] = rho * (1.0 if factor is None else factor)
                mask[i] = perturb
        return rhos, mask


SINGLE = Layout((((0, 1, 2, 3), None, True),))
LAYOUTS = {
    "per_group_rho": Layout((((0, 2), None, True), ((1, 3), 3.0, True))),
    "excluded_biases": Layout((((0, 2), None, True), ((1, 3), None, False))),
}


def make_opt(name: str, model: nn.Module, base: str = "sgd", layout: Layout = SINGLE, **extra: Any) -> SharpnessAware:
    member = MEMBERS[name]
    options = {**member.options, **BASES[base].options, **extra}
    return OPTIMIZERS.get(name)(layout.torch_groups(model, member.rho), base, rho=member.rho, **options)


def reference_run(
    name: str,
    base: str,
    steps: list[list[Batch]],
    *,
    layout: Layout = SINGLE,
    lrs: list[float] | None = None,
    m_sharpness: bool = False,
    anchor: Callable[[list[Tensor], Batch], Grads] | None = None,
    seed: int = 0,
) -> list[list[Tensor]]:
    """The parameters after each step. Each step is a list of micro-batches whose gradients are
    averaged (accumulation), or, with m_sharpness, whose SAM gradients are averaged."""
    member = MEMBERS[name]
    lr0 = BASES[base].options["lr"]
    opt = BASES[base].reference(**BASES[base].options)
    ws = params_of(Net(seed=seed))
    base_rhos, mask = layout.per_tensor(member.rho)
    trajectory = []
    for t, micro in enumerate(steps):
        lr = lr0 if lrs is None else lrs[t]
        rhos = [member.rho_at(rho, lr, lr0) for rho in base_rhos]
        groups = [[b] for b in micro] if m_sharpness else [micro]
        d = mean([reference_direction(member, ws, group, rhos, mask) for group in groups])
        if anchor is not None:
            d = [a + b for a, b in zip(d, mean([anchor(ws, b) for b in micro]))]
        ws = opt.step(ws, d, lr)
        trajectory.append(ws)
    return trajectory


def reference_direction(
    member: Member, ws: list[Tensor], micro: list[Batch], rhos: list[float], mask: list[bool]
) -> Grads:
    g = mean([member.ascent(ws, b) for b in micro])
    e = member.perturbation(ws, g, rhos, mask)
    gp = mean([ce_grads([w + ei for w, ei in zip(ws, e)], b) for b in micro])
    return member.descent(g, gp, mask)


def mean(lists: list[Grads]) -> Grads:
    return [sum(ts) / len(lists) for ts in zip(*lists)]


# --------------------------------------------------------------------------- driving the optimizer
def first_loss(opt: SharpnessAware, logits: Tensor, y: Tensor) -> Tensor:
    """The first-pass loss the protocol asks for: the member's ascent objective, else the training loss."""
    return opt.ascent_loss(logits, y) if opt.ascent_loss is not None else F.cross_entropy(logits, y)


def driver_ascent(opt: SharpnessAware, model: nn.Module) -> Callable[[Batch], Tensor] | None:
    if opt.ascent_loss is None:
        return None
    return lambda b: opt.ascent_loss(model(b[0]), b[1])


def ce(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def path_manual(opt: SharpnessAware, model: nn.Module, batch: Batch) -> None:
    x, y = batch
    first_loss(opt, model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def path_keep_grads(opt: SharpnessAware, model: nn.Module, batch: Batch) -> None:
    """first_step(zero_grad=False): e lives in its own buffers; the caller zeroes the gradients."""
    x, y = batch
    first_loss(opt, model(x), y).backward()
    opt.first_step(zero_grad=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def path_unperturb_step(opt: SharpnessAware, model: nn.Module, batch: Batch) -> None:
    """The GradScaler order without a scaler: unperturb(), then step() without a closure."""
    x, y = batch
    first_loss(opt, model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.unperturb()
    opt.step()
    opt.zero_grad()


def path_closure(opt: SharpnessAware, model: nn.Module, batch: Batch) -> None:
    """davda54/sam: the caller's backward is the first pass; the closure runs once, at w + e."""
    x, y = batch
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first_loss(opt, model(x), y).backward()
    opt.step(closure)
    opt.zero_grad()
    assert len(calls) == 1


def path_driver(opt: SharpnessAware, model: nn.Module, batch: Batch) -> None:
    sam_backward(opt, [batch], ce(model), ascent=driver_ascent(opt, model))
    opt.step()
    opt.zero_grad()


PATHS = {
    "manual": path_manual,
    "keep_grads": path_keep_grads,
    "unperturb_step": path_unperturb_step,
    "closure": path_closure,
    "driver": path_driver,
}


def assert_params(model: nn.Module, expected: list[Tensor], atol: float = ATOL, msg: str = "") -> None:
    for i, (p, e) in enumerate(zip(model.parameters(), expected)):
        torch.testing.assert_close(
            p.detach(), e.to(p.dtype), atol=atol, rtol=0, msg=lambda m, i=i: f"{msg} tensor {i}: {m}"
        )


# =========================================================================== the table itself
def test_table_covers_the_registry() -> None:
    assert NAMES, "no SAM-family member is registered"
    assert sorted(MEMBERS) == NAMES


def test_references_are_pairwise_distinct() -> None:
    """Each member's formula moves the weights differently from every other and from the base
    step alone, so that a test passing with the wrong member's formula is impossible."""
    steps = [[b] for b in make_batches(2)]
    # GAQAT is SAGM on a model without LSQ step sizes, by design
    runs = {name: reference_run(name, "sgd", steps)[-1] for name in NAMES if name != "gaqat"}
    plain = Net()
    opt = torch.optim.SGD(plain.parameters(), **BASES["sgd"].options)
    for ((x, y),) in steps:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    runs["base optimizer alone"] = params_of(plain)
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = max((x - y).abs().max().item() for x, y in zip(runs[a], runs[b]))
            assert gap > 1e-5, f"{a} and {b} give the same weights (max gap {gap:.2e})"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name: str, base: str, path: str) -> None:
    """One and five steps of each API path against the float64 formula, after every step."""
    batches = make_batches(5)
    expected = reference_run(name, base, [[b] for b in batches])
    model = Net()
    opt = make_opt(name, model, base)
    for t, batch in enumerate(batches):
        PATHS[path](opt, model, batch)
        assert_params(model, expected[t], msg=f"step {t + 1}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["manual", "closure", "driver"])
@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups(name: str, path: str, layout: str) -> None:
    """Per-group rho, and a `perturb=False` group: not perturbed, but stepped by the base optimizer."""
    batches = make_batches(3)
    expected = reference_run(name, "sgd", [[b] for b in batches], layout=LAYOUTS[layout])
    model = Net()
    opt = make_opt(name, model, "sgd", LAYOUTS[layout])
    for t, batch in enumerate(batches):
        PATHS[path](opt, model, batch)
        assert_params(model, expected[t], msg=f"step {t + 1}")


@pytest.mark.parametrize("name", NAMES)
def test_excluded_group_is_not_perturbed(name: str) -> None:
    model = Net()
    opt = make_opt(name, model, "sgd", LAYOUTS["excluded_biases"])
    before = params_of(model)
    x, y = make_batches(1)[0]
    first_loss(opt, model(x), y).backward()
    opt.first_step(zero_grad=True)
    now = list(model.parameters())
    assert not torch.equal(now[0], before[0]) and not torch.equal(now[2], before[2])
    assert torch.equal(now[1], before[1]) and torch.equal(now[3], before[3])
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    now = list(model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(now, before)), "the base optimizer must step every group"


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_later(name: str) -> None:
    """A group added after construction gets the member's defaults and is stepped like the others."""
    batches = make_batches(2)
    layout = LAYOUTS["excluded_biases"]
    expected = reference_run(name, "sgd", [[b] for b in batches], layout=layout)
    model = Net()
    params = list(model.parameters())
    member = MEMBERS[name]
    opt = OPTIMIZERS.get(name)([params[0], params[2]], "sgd", rho=member.rho, **member.options, **BASES["sgd"].options)
    opt.add_param_group({"params": [params[1], params[3]], "perturb": False})
    assert opt.param_groups[1]["rho"] == member.rho
    assert opt.param_groups is opt.base_optimizer.param_groups
    for t, batch in enumerate(batches):
        path_manual(opt, model, batch)
        assert_params(model, expected[t], msg=f"step {t + 1}")


# =========================================================================== closure conventions
def between_nothing(opt: SharpnessAware, model: nn.Module) -> None:
    """Lightning: the closure zeroes the gradients itself; last step's gradients are still there."""


def between_zero_grad(opt: SharpnessAware, model: nn.Module) -> None:
    opt.zero_grad()


def between_zero_grad_keep(opt: SharpnessAware, model: nn.Module) -> None:
    opt.zero_grad(set_to_none=False)


def between_model_zero_grad(opt: SharpnessAware, model: nn.Module) -> None:
    model.zero_grad()


BETWEEN = {
    "lightning": between_nothing,
    "opt.zero_grad": between_zero_grad,
    "opt.zero_grad(set_to_none=False)": between_zero_grad_keep,
    "model.zero_grad": between_model_zero_grad,
}


@pytest.mark.parametrize("between", BETWEEN)
@pytest.mark.parametrize("name", NAMES)
def test_closure_run_first(name: str, between: str) -> None:
    """torch/Lightning convention: no fresh gradient when step(closure) is called, so the closure
    (zero_grad + forward + backward) runs twice: at w, then at w + e. Same weights as the manual
    path with the training loss as first pass, and step() returns the loss at w."""
    batches = make_batches(4)
    ref_model, model = Net(), Net()
    ref_opt, opt = make_opt(name, ref_model), make_opt(name, model)
    for batch in batches:
        x, y = batch
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.second_step(zero_grad=True)

        calls: list[int] = []

        def closure(x: Tensor = x, y: Tensor = y, calls: list[int] = calls) -> Tensor:
            calls.append(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            loss_at_w = F.cross_entropy(model(x), y)
        BETWEEN[between](opt, model)
        loss = opt.step(closure)
        assert len(calls) == 2, f"the closure ran {len(calls)} times, expected 2 (first at w, then at w + e)"
        torch.testing.assert_close(loss.detach(), loss_at_w, atol=1e-12, rtol=0)
        assert_params(model, params_of(ref_model))


# =========================================================================== exact restore
@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_unperturb_restores_bit_exactly(name: str, zero_grad: bool) -> None:
    """In float32, w + e - e is not w; the weights must come back bit for bit."""
    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    x, y = make_batches(1, dtype=torch.float32)[0]
    for _ in range(3):
        before = params_of(model)
        first_loss(opt, model(x), y).backward()
        opt.first_step(zero_grad=zero_grad)
        assert opt.is_perturbed
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.unperturb()
        assert not opt.is_perturbed
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_first_pass_cannot_corrupt_weights(name: str) -> None:
    """fp16 overflow: an inf in the first-pass gradient makes w + e NaN; unperturb() restores w bit
    for bit, GradScaler skips the step, and training then goes on normally."""
    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_batches(1, dtype=torch.float32)[0]
    before = params_of(model)
    scaler.scale(first_loss(opt, model(x), y)).backward()
    opt.loss_scale = scaler.get_scale()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.unperturb()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    scaler.step(opt)  # finds the non-finite gradients: no base step
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0**16, "the scaler must have seen the overflow"
    opt.zero_grad()
    scaler_recipe(opt, model, scaler, (x, y))
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# =========================================================================== the driver
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equals_one_big_batch(name: str, base: str) -> None:
    """k micro-batches through sam_backward == the whole batch at once (same step), and both the
    reference (perturbation from the accumulated gradient)."""
    batches = make_batches(3)
    expected = reference_run(name, base, [split(b, 4) for b in batches])
    big, acc = Net(), Net()
    big_opt, acc_opt = make_opt(name, big, base), make_opt(name, acc, base)
    for t, batch in enumerate(batches):
        s_big = sam_backward(big_opt, [batch], ce(big), ascent=driver_ascent(big_opt, big))
        s_acc = sam_backward(acc_opt, split(batch, 4), ce(acc), ascent=driver_ascent(acc_opt, acc))
        torch.testing.assert_close(s_acc.ascent_loss, s_big.ascent_loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(s_acc.descent_loss, s_big.descent_loss, atol=ATOL, rtol=0)
        for p, q in zip(acc.parameters(), big.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=0)
        big_opt.step()
        acc_opt.step()
        assert_params(acc, params_of(big), msg=f"step {t + 1}")
        assert_params(acc, expected[t], msg=f"step {t + 1}")


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", NAMES)
def test_m_sharpness(name: str, base: str) -> None:
    """m_sharpness=True: each micro-batch its own e, the perturbed (member) gradients averaged."""
    batches = make_batches(3)
    expected = reference_run(name, base, [split(b, 4) for b in batches], m_sharpness=True)
    m, not_m = (reference_run(name, "sgd", [split(batches[0], 4)], m_sharpness=flag)[0] for flag in (True, False))
    assert max((a - b).abs().max().item() for a, b in zip(m, not_m)) > 1e-6, "m-sharpness must matter here"
    model = Net()
    opt = make_opt(name, model, base)
    for t, batch in enumerate(batches):
        sam_backward(opt, split(batch, 4), ce(model), ascent=driver_ascent(opt, model), m_sharpness=True)
        opt.step()
        assert_params(model, expected[t], msg=f"step {t + 1}")


def anchor_loss(logits: Tensor) -> Tensor:
    return 0.3 * (logits**2).mean()


def anchor_grads(ws: list[Tensor], batch: Batch) -> Grads:
    ws = leaves(ws)
    return list(torch.autograd.grad(anchor_loss(functional(ws, batch[0])), ws))


@pytest.mark.parametrize("m_sharpness", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_anchor_is_added_at_w(name: str, m_sharpness: bool) -> None:
    """grad = member gradient + grad anchor(w), the anchor at the unperturbed weights; the
    returned losses are the means at w (ascent, anchor) and at w + e (descent)."""
    batches = make_batches(3)
    expected = reference_run(name, "sgd", [split(b, 2) for b in batches], m_sharpness=m_sharpness, anchor=anchor_grads)
    model = Net()
    opt = make_opt(name, model)
    for t, batch in enumerate(batches):
        micro = split(batch, 2)
        with torch.no_grad():
            at_w = [first_loss(opt, model(b[0]), b[1]) for b in micro]
            anchor_at_w = [anchor_loss(model(b[0])) for b in micro]
        stats = sam_backward(
            opt,
            micro,
            ce(model),
            ascent=driver_ascent(opt, model),
            anchor=lambda b: anchor_loss(model(b[0])),
            m_sharpness=m_sharpness,
        )
        torch.testing.assert_close(stats.ascent_loss, sum(at_w) / 2, atol=ATOL, rtol=0)
        torch.testing.assert_close(stats.anchor_loss, sum(anchor_at_w) / 2, atol=ATOL, rtol=0)
        assert stats.descent_loss.item() != pytest.approx(
            (sum(F.cross_entropy(model(b[0]), b[1]) for b in micro) / 2).item(), abs=1e-9
        ), "the descent loss must be taken at w + e"
        opt.step()
        opt.zero_grad()
        assert_params(model, expected[t], msg=f"step {t + 1}")


# =========================================================================== LR schedules
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_the_base_optimizer(name: str, base: str) -> None:
    """A scheduler attached to the SAM optimizer sets the lr the base optimizer uses (and, where
    the member schedules rho with the lr, rho as well)."""
    factor = lambda t: 1.0 / (1.0 + t)
    lr0 = BASES[base].options["lr"]
    batches = make_batches(5)
    expected = reference_run(name, base, [[b] for b in batches], lrs=[lr0 * factor(t) for t in range(5)])
    model = Net()
    opt = make_opt(name, model, base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for t, batch in enumerate(batches):
        path_closure(opt, model, batch)
        scheduler.step()
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * factor(t + 1), rel=1e-15)
        assert_params(model, expected[t], msg=f"step {t + 1}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_every_api_path_is_an_optimizer_step(name: str, path: str) -> None:
    """Each path's base step goes through the SAM optimizer's step(): step hooks fire once per
    step and an LR scheduler sees the step (no "lr_scheduler.step() before optimizer.step()")."""
    model = Net()
    opt = make_opt(name, model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    pre, post = [], []
    opt.register_step_pre_hook(lambda *args: pre.append(1))
    opt.register_step_post_hook(lambda *args: post.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "GAQAT: none of the perturbed parameters")  # no step sizes in Net: SAGM
        for t, batch in enumerate(make_batches(3)):
            PATHS[path](opt, model, batch)
            scheduler.step()
            assert len(pre) == len(post) == t + 1
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(BASES["sgd"].options["lr"] / 8, rel=1e-15)


# =========================================================================== state_dict
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name: str, base: str) -> None:
    """Save after 3 steps (optimizer with its base optimizer's momentum/Adam state, scheduler,
    weights), load into fresh objects, train 3 more: bit-identical to the uninterrupted run."""
    batches = make_batches(6)
    model = Net()
    opt = make_opt(name, model, base)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for batch in batches[:3]:
        path_manual(opt, model, batch)
        scheduler.step()

    state = opt.state_dict()
    assert all("rho" in group for group in state["param_groups"])
    assert len(state["state"]) == 4
    for per_param in state["state"].values():
        for key in BASES[base].state_keys:
            assert key in per_param and torch.count_nonzero(per_param[key]) > 0
    buffer = io.BytesIO()
    torch.save({"opt": state, "sched": scheduler.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = Net(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_opt(name, resumed, base)
    resumed_sched = torch.optim.lr_scheduler.StepLR(resumed_opt, step_size=2, gamma=0.5)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    for batch in batches[3:]:
        path_manual(opt, model, batch)
        scheduler.step()
        path_manual(resumed_opt, resumed, batch)
        resumed_sched.step()
        assert resumed_opt.base_optimizer.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"]
        assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), model.parameters()))

    # and a run that did not keep the base optimizer's state would differ
    fresh = Net(seed=123)
    fresh.load_state_dict(saved["model"])
    fresh_opt = make_opt(name, fresh, base)
    for group in fresh_opt.param_groups:
        group["lr"] = saved["opt"]["param_groups"][0]["lr"]
    path_manual(fresh_opt, fresh, batches[3])
    resumed_one = Net(seed=123)
    resumed_one.load_state_dict(saved["model"])
    resumed_one_opt = make_opt(name, resumed_one, base)
    resumed_one_opt.load_state_dict(saved["opt"])
    path_manual(resumed_one_opt, resumed_one, batches[3])
    assert not all(torch.equal(p, q) for p, q in zip(fresh.parameters(), resumed_one.parameters()))


# =========================================================================== mixed precision
def run_fp32(name: str, model: nn.Module, batches: list[Batch], clip: float | None = None) -> None:
    opt = make_opt(name, model)
    for x, y in batches:
        first_loss(opt, model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.unperturb()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def scaler_recipe(opt: SharpnessAware, model: nn.Module, scaler: torch.amp.GradScaler, batch: Batch) -> None:
    x, y = batch
    scaler.scale(first_loss(opt, model(x), y)).backward()
    opt.loss_scale = scaler.get_scale()  # the manual API's part for members whose e is not scale invariant
    opt.first_step(True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.unperturb()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def scaler_recipe_clipped(opt: SharpnessAware, model: nn.Module, scaler: torch.amp.GradScaler, batch: Batch) -> None:
    x, y = batch
    scaler.scale(first_loss(opt, model(x), y)).backward()
    opt.loss_scale = scaler.get_scale()  # the manual API's part for members whose e is not scale invariant
    opt.first_step(True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.unperturb()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def scaler_driver(opt: SharpnessAware, model: nn.Module, scaler: torch.amp.GradScaler, batch: Batch) -> None:
    sam_backward(opt, split(batch, 2), ce(model), ascent=driver_ascent(opt, model), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


CLIP = 0.05
SCALER_RECIPES = {"recipe": scaler_recipe, "unscale_and_clip": scaler_recipe_clipped, "driver": scaler_driver}


@pytest.mark.parametrize("recipe", SCALER_RECIPES)
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler(name: str, recipe: str) -> None:
    """The fp16 recipe with torch.amp.GradScaler (here on CPU, float32 model): first_step on the
    scaled gradients, one unscale in scaler.step; same weights as unscaled fp32 SAM."""
    batches = make_batches(4, dtype=torch.float32)
    reference = Net(dtype=torch.float32)
    run_fp32(name, reference, batches, clip=CLIP if recipe == "unscale_and_clip" else None)
    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=1)
    for batch in batches:
        SCALER_RECIPES[recipe](opt, model, scaler, batch)
    assert scaler.get_scale() == 2.0**18, "no step may be skipped"
    assert_params(model, params_of(reference), atol=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), Net(dtype=torch.float32).parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name: str) -> None:
    """bf16 autocast on CPU runs and stays close to fp32 (bf16 has 8 bits of mantissa)."""
    batches = make_batches(3, dtype=torch.float32)
    reference, model = Net(dtype=torch.float32), Net(dtype=torch.float32)
    start = params_of(model)
    ref_opt, opt = make_opt(name, reference), make_opt(name, model)
    for x, y in batches:
        path_manual(ref_opt, reference, (x, y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            first_loss(opt, logits, y).backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    moved = max((p - s).abs().max().item() for p, s in zip(reference.parameters(), start))
    gap = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    assert gap < 0.05 * moved, f"bf16 run is {gap:.3g} away from fp32, which moved {moved:.3g}"


# =========================================================================== batch norm
class BNNet(nn.Module):
    def __init__(self, momentum: float | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(IN, HIDDEN, dtype=torch.float64)
        self.bn = nn.BatchNorm1d(HIDDEN, momentum=momentum, dtype=torch.float64)
        self.fc2 = nn.Linear(HIDDEN, CLASSES, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


@pytest.mark.parametrize("m_sharpness", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", NAMES)
def test_batch_norm_stats_from_first_pass_only(name: str, momentum: float | None, m_sharpness: bool) -> None:
    """sam_backward(..., model=m): running mean/var and num_batches_tracked are what a plain
    training step at w would leave (the first passes), not touched at w + e or by the anchor."""
    model, plain = BNNet(momentum), BNNet(momentum)
    opt = make_opt(name, model)
    for t, batch in enumerate(make_batches(2)):
        micro = split(batch, 2)
        with torch.no_grad():
            for x, _ in micro:
                plain(x)  # the stats a plain step at w would leave
        sam_backward(
            opt,
            micro,
            ce(model),
            ascent=driver_ascent(opt, model),
            anchor=lambda b: anchor_loss(model(b[0])),
            m_sharpness=m_sharpness,
            model=model,
        )
        assert model.bn.num_batches_tracked.item() == 2 * (t + 1)
        torch.testing.assert_close(model.bn.running_mean, plain.bn.running_mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.bn.running_var, plain.bn.running_var, atol=ATOL, rtol=0)
        assert model.bn.track_running_stats
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, q in zip(plain.parameters(), model.parameters()):
                p.copy_(q)


# =========================================================================== allocations
def allocations(fn: Callable[[], Any]) -> list[int]:
    """Sizes in bytes of every CPU allocation made while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


class WideNet(nn.Module):
    """Parameters of at least 64 elements, so that scalar bookkeeping is far below any of them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_no_parameter_sized_allocation_after_first_step(name: str, zero_grad: bool) -> None:
    """After the first step, first_step / unperturb / the base step (SGD with momentum) allocate
    nothing as large as the smallest parameter (the backups and buffers are reused)."""
    model = WideNet()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1, momentum=0.9)
    smallest = min(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 64, (8,), generator=gen)
    for step in range(3):
        first_loss(opt, model(x), y).backward()
        first = allocations(lambda: opt.first_step(zero_grad=zero_grad))
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        second = allocations(opt.unperturb) + allocations(opt.step)
        opt.zero_grad(set_to_none=False)
        big = [n for n in first + second if n >= smallest]
        if step == 0:
            assert big, "the profiler must see the first step's per-parameter buffers"
        else:
            assert not big, f"step {step + 1} allocated {big} bytes (smallest parameter: {smallest} bytes)"


# members whose default groups build w + e in the gradients (ASAM's adaptive groups keep the backup); a bare
# tensor, not WideNet, so that collecting the tests does not reseed the global generator
SWAPPING = [n for n in NAMES if not OPTIMIZERS.get(n)([torch.zeros(1, requires_grad=True)], "sgd").defaults["adaptive"]]


@pytest.mark.parametrize("name", SWAPPING)
def test_dropped_gradients_hold_the_perturbed_weights(name: str) -> None:
    """first_step(zero_grad=True) builds w + e in the gradient tensors and swaps them in: no backup
    buffer is ever allocated, no parameter-sized tensor is allocated by first_step / unperturb (GSAM
    keeps its copy of g), and after unperturb() every weight is back in its own tensor, bit for bit."""
    model = WideNet()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    smallest = min(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 64, (8,), generator=gen)
    pointers = [p.data_ptr() for p in model.parameters()]
    for step in range(2):
        before = params_of(model)
        first_loss(opt, model(x), y).backward()
        grads = [p.grad.data_ptr() for p in model.parameters()]
        big = [n for n in allocations(lambda: opt.first_step(zero_grad=True)) if n >= smallest]
        assert [p.data_ptr() for p in model.parameters()] == grads, "w + e must live in the gradients' tensors"
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(model(x), y).backward()
        big += [n for n in allocations(opt.unperturb) if n >= smallest]
        assert [p.data_ptr() for p in model.parameters()] == pointers
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        opt.step()
        opt.zero_grad()
        assert all("backup" not in opt.state[p] for p in model.parameters())
        expected = len(pointers) if name in ("gsam", "sagm", "gaqat") and step == 0 else 0  # their copy of g, once
        assert len(big) == expected, big


@pytest.mark.parametrize("name", NAMES)
def test_gradient_views_fall_back_to_the_backup(name: str) -> None:
    """Gradients that are views into one flat buffer (DDP's gradient buckets, which DDP attaches
    again before each backward) must not become the weights (the next backward would write into
    them): the weights are copied to the backup instead, and the step equals that of a model with
    ordinary gradients."""
    plain, bucketed = WideNet(), WideNet()
    opts = [OPTIMIZERS.get(name)(m.parameters(), "sgd", lr=0.1) for m in (plain, bucketed)]
    flat = torch.zeros(sum(p.numel() for p in bucketed.parameters()))

    def attach_bucket_views() -> None:
        flat.zero_()
        offset = 0
        for p in bucketed.parameters():
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 64, (8,), generator=gen)
    for model, opt in zip((plain, bucketed), opts):
        pointers = [p.data_ptr() for p in model.parameters()]
        if model is bucketed:
            attach_bucket_views()
        first_loss(opt, model(x), y).backward()
        opt.first_step(zero_grad=True)
        if model is bucketed:
            assert [p.data_ptr() for p in model.parameters()] == pointers
            attach_bucket_views()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert_params(bucketed, params_of(plain), atol=1e-6)
    assert all("backup" in opts[1].state[p] for p in bucketed.parameters())
