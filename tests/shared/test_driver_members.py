"""SAF, MESA and TRAM against float64 references of their papers' formulas, written here per step in
plain code, and the contract checks every driver-only member passes (resume, accumulation, groups,
mixed precision, bad input). A new driver-only member must be added to `MEMBERS`. UDIM's own
formulas are in test_udim.py.

Papers: SAF and MESA (Du et al., NeurIPS 2022), TRAM (Sherborne et al., ICLR 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import OPTIMIZERS, Batch, build_optimizer, chunk, member_backward
from shared.sam import trajectory_loss, trust_region_distance

IN, HIDDEN, CLASSES, N = 5, 7, 4, 24
LR, MOMENTUM = 0.1, 0.0
ATOL = 1e-10

#: every driver-only member and the options its tests use (small start/past so that a few epochs
#: exercise the buffer; MESA's beta short enough for the EMA to move)
MEMBERS: dict[str, dict[str, Any]] = {
    "saf": {"lam": 0.5, "tau": 2.0, "past": 2, "start_epoch": 2},
    "mesa": {"lam": 0.8, "tau": 2.0, "beta": 0.7, "start_step": 1},
    "tram-prev": {},
    "tram-init": {},
    "tram-x": {"sigma": 0.3},
    "udim": {"rho_x": 0.5, "lam": 1.0, "warmup_steps": 0},  # an input step of the data's scale: the term matters
}


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN, dtype=dtype)
        self.bn = nn.BatchNorm1d(HIDDEN, dtype=dtype) if bn else nn.Identity()
        self.fc2 = nn.Linear(HIDDEN, CLASSES, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def functional(ws: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = ws
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, IN, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=gen)


def epochs(n: int, batch: int = 8, seed: int = 2) -> list[Tensor]:
    """The index batches of n shuffled epochs."""
    gen = torch.Generator().manual_seed(seed)
    return [idx for _ in range(n) for idx in torch.randperm(N, generator=gen).split(batch)]


def grads(ws: list[Tensor], loss_fn: Callable[[list[Tensor]], Tensor]) -> list[Tensor]:
    leaves = [w.detach().clone().requires_grad_(True) for w in ws]
    return list(torch.autograd.grad(loss_fn(leaves), leaves))


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-example KL(softmax(p) || softmax(q)) by its definition."""
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    return (p * (p.log() - q.log())).sum(-1)


def run(name: str, steps: list[Tensor], options: dict[str, Any] | None = None, model: nn.Module | None = None,
        k: int = 1, seed: int = 5, **base: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    x, y = data()
    model = model or Net()
    opt = build_optimizer(name, model.parameters(), lr=LR, momentum=MOMENTUM,
                          **{**MEMBERS.get(name, {}), **(options or {}), **base})
    for t, idx in enumerate(steps):
        torch.manual_seed(seed + t)  # tram-x's noise
        member_backward(opt, model, chunk(Batch(x[idx], y[idx], idx), math.ceil(len(idx) / k)))
        opt.step()
    return model, opt


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_weights(model: nn.Module, expected: list[Tensor], atol: float = ATOL) -> None:
    for i, (p, e) in enumerate(zip(model.parameters(), expected)):
        torch.testing.assert_close(p.detach(), e.to(p.dtype), atol=atol, rtol=0, msg=lambda m, i=i: f"tensor {i}: {m}")


# =========================================================================== the formulas
def test_trajectory_loss_is_tau_squared_mean_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    z, old = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    tau = 3.0
    expected = tau**2 * (kl(old / tau, z / tau) * mask).sum() / 6
    torch.testing.assert_close(trajectory_loss(z, old, tau, mask), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(trajectory_loss(z, old, tau), tau**2 * kl(old / tau, z / tau).mean(), atol=1e-12, rtol=0)


def test_trust_region_distance_is_batchmean_kl_independent_of_batch_size() -> None:
    gen = torch.Generator().manual_seed(0)
    target, z = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    d = trust_region_distance(target, z)
    torch.testing.assert_close(d, kl(target, z).mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(trust_region_distance(target.repeat(3, 1), z.repeat(3, 1)), d, atol=1e-12, rtol=0)
    # sequences: every position is an example
    torch.testing.assert_close(trust_region_distance(target.reshape(2, 3, 5), z.reshape(2, 3, 5)), d, atol=1e-12, rtol=0)


def test_saf_matches_a_reference_with_its_own_past_outputs_across_shuffled_epochs() -> None:
    """The reference remembers every example's logits per epoch in a dict keyed by (example,
    epoch) and adds lam tau^2 KL(past || now) from epoch start_epoch on: SAF's ring buffer must
    give the same weights after 5 shuffled epochs, i.e. every example gets its own past output."""
    opts = MEMBERS["saf"]
    lam, tau, past, start = opts["lam"], opts["tau"], opts["past"], opts["start_epoch"]
    x, y = data()
    steps = epochs(5)
    ws = weights(Net())
    seen: dict[tuple[int, int], Tensor] = {}
    visits = [0] * N
    for idx in steps:
        logits = functional(ws, x[idx]).detach()
        epoch = visits[int(idx[0])]
        past_logits = [seen.get((int(i), epoch - past)) for i in idx]
        active = epoch >= start

        def loss(w: list[Tensor], idx: Tensor = idx, past_logits: list[Tensor | None] = past_logits,
                 active: bool = active) -> Tensor:
            z = functional(w, x[idx])
            total = F.cross_entropy(z, y[idx])
            if active:
                total = total + lam * tau**2 * kl(torch.stack(past_logits) / tau, z / tau).mean()
            return total

        g = grads(ws, loss)
        for row, i in enumerate(idx):
            seen[(int(i), epoch)] = logits[row].float().double()  # the buffer holds float32
            visits[int(i)] += 1
        ws = [w - LR * gw for w, gw in zip(ws, g)]
    model, _ = run("saf", steps)
    assert_weights(model, ws)
    # and the term mattered: without it the weights differ
    plain, _ = run("sgd", steps)
    assert max((a - b).abs().max().item() for a, b in zip(weights(plain), ws)) > 1e-4


def test_mesa_matches_a_reference_with_an_ema_teacher() -> None:
    """v <- beta v + (1 - beta) w after each step (v_0 = w_0); the loss adds lam tau^2
    KL(p_v || p_w) from step start_step on."""
    opts = MEMBERS["mesa"]
    lam, tau, beta, start = opts["lam"], opts["tau"], opts["beta"], opts["start_step"]
    x, y = data()
    steps = epochs(2)
    ws = weights(Net())
    vs = [w.clone() for w in ws]
    for t, idx in enumerate(steps):
        teacher = functional(vs, x[idx]).detach()

        def loss(w: list[Tensor], idx: Tensor = idx, teacher: Tensor = teacher, t: int = t) -> Tensor:
            z = functional(w, x[idx])
            total = F.cross_entropy(z, y[idx])
            return total + lam * tau**2 * kl(teacher / tau, z / tau).mean() if t >= start else total

        ws = [w - LR * gw for w, gw in zip(ws, grads(ws, loss))]
        vs = [beta * v + (1 - beta) * w for v, w in zip(vs, ws)]
    model, opt = run("mesa", steps)
    assert_weights(model, ws)
    for e, v in zip(opt._ema.module.parameters(), vs):
        torch.testing.assert_close(e.detach(), v, atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["prev", "init", "x"])
def test_tram_matches_eq_7_with_its_trust_region_radius(target: str) -> None:
    """d = mean_i KL(p_target || p_w) with the target w_{t-1} (w_0 on the first step), w_0, or the
    model on x + sigma z; e = d w^2 g / ||w g||; the SGD step uses the gradient at w + e."""
    sigma = MEMBERS["tram-x"]["sigma"]
    x, y = data()
    steps = epochs(2)
    ws = weights(Net())
    w0, prev = [w.clone() for w in ws], [w.clone() for w in ws]
    radii = []
    for t, idx in enumerate(steps):
        xb, yb = x[idx], y[idx]
        g = grads(ws, lambda w, xb=xb, yb=yb: F.cross_entropy(functional(w, xb), yb))
        z = functional(ws, xb).detach()
        if target == "x":
            torch.manual_seed(5 + t)
            teacher = functional(ws, xb + sigma * torch.randn_like(xb))
        else:
            teacher = functional(prev if target == "prev" else w0, xb)
        d = kl(teacher, z).mean()
        radii.append(float(d))
        norm = torch.sqrt(sum(((w * gw) ** 2).sum() for w, gw in zip(ws, g)))
        e = [d * w * w * gw / (norm + 1e-12) for w, gw in zip(ws, g)]
        gp = grads([w + ei for w, ei in zip(ws, e)], lambda w, xb=xb, yb=yb: F.cross_entropy(functional(w, xb), yb))
        prev = [w.clone() for w in ws]
        ws = [w - LR * gw for w, gw in zip(ws, gp)]
    model, opt = run(f"tram-{target}", steps)
    assert_weights(model, ws)
    assert radii[-1] > 1e-6 and (target != "prev" or radii[0] == 0.0)
    assert opt.last_radius.item() == pytest.approx(radii[-1], abs=1e-12)


# =========================================================================== the contract
@pytest.mark.parametrize("name", MEMBERS)
def test_resume_from_state_dict_repeats_the_uninterrupted_run(name: str) -> None:
    """Stop after 1.5 epochs, rebuild model and optimizer from their state dicts (the SAF buffer,
    the EMA and TRAM's target included), continue: the same weights as never stopping."""
    steps = epochs(5)
    whole, _ = run(name, steps, model=Net(bn=True))
    half, opt = run(name, steps[:4], model=Net(bn=True))
    model = Net(bn=True, seed=9)
    model.load_state_dict(half.state_dict())
    fresh = build_optimizer(name, model.parameters(), lr=LR, momentum=MOMENTUM, **MEMBERS[name])
    state = opt.state_dict()
    fresh.load_state_dict(state)
    x, y = data()
    for t, idx in enumerate(steps[4:], start=4):
        torch.manual_seed(5 + t)
        member_backward(fresh, model, [Batch(x[idx], y[idx], idx)])
        fresh.step()
    assert_weights(model, weights(whole), atol=0)
    torch.testing.assert_close(model.bn.running_mean, whole.bn.running_mean, atol=0, rtol=0)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skip(reason=(
        "udim: its term is not a mean over examples (R_var is a variance of per-example gradients across the "
        "micro-batch, and ||g|| in x~'s objective is the micro-batch's), so k micro-batches give the mean of k "
        "terms, not the whole batch's term; test_udim.py checks that mean instead"))) if n == "udim" else n
    for n in MEMBERS if n != "tram-x"])  # tram-x draws its noise per micro-batch
def test_accumulation_equals_one_big_batch(name: str) -> None:
    one, _ = run(name, epochs(4))
    two, _ = run(name, epochs(4), k=2)
    assert_weights(two, weights(one), atol=1e-12)


@pytest.mark.parametrize("name", MEMBERS)
def test_adamw_base_and_lr_scheduler_drive_the_member(name: str) -> None:
    model = Net()
    opt = build_optimizer(name, model.parameters(), "adamw", lr=0.01, weight_decay=0.1, **MEMBERS[name])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    for idx in epochs(1):
        member_backward(opt, model, [Batch(x[idx], y[idx], idx)])
        opt.step()
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert all(len(s) for s in opt.base_optimizer.state.values())  # Adam moments exist


def test_tram_leaves_an_excluded_group_unperturbed() -> None:
    """perturb=False on the biases: e (and its norm) covers the weight matrices only; every
    tensor steps with the gradient at (W + e, b)."""
    sigma = MEMBERS["tram-x"]["sigma"]
    model = Net()
    groups = [{"params": [model.fc1.weight, model.fc2.weight]},
              {"params": [model.fc1.bias, model.fc2.bias], "perturb": False}]
    opt = build_optimizer("tram-x", groups, lr=LR, sigma=sigma)
    x, y = data()
    idx = torch.arange(8)
    xb, yb = x[idx], y[idx]
    ws = weights(model)  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
    g = grads(ws, lambda w: F.cross_entropy(functional(w, xb), yb))
    torch.manual_seed(5)
    d = kl(functional(ws, xb + sigma * torch.randn_like(xb)), functional(ws, xb).detach()).mean()
    perturbed = [0, 2]
    norm = torch.sqrt(sum(((ws[i] * g[i]) ** 2).sum() for i in perturbed))
    moved = [w + (d * w * w * gw / (norm + 1e-12) if i in perturbed else 0) for i, (w, gw) in enumerate(zip(ws, g))]
    gp = grads(moved, lambda w: F.cross_entropy(functional(w, xb), yb))
    torch.manual_seed(5)
    member_backward(opt, model, [Batch(xb, yb, idx)])
    opt.step()
    assert_weights(model, [w - LR * gw for w, gw in zip(ws, gp)])


@pytest.mark.parametrize("name", MEMBERS)
def test_bf16_autocast_runs_finite(name: str) -> None:
    model = Net(dtype=torch.float32)
    opt = build_optimizer(name, model.parameters(), lr=LR, **MEMBERS[name])
    x, y = data()
    for idx in epochs(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            member_backward(opt, model, [Batch(x[idx].float(), y[idx], idx)])
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", MEMBERS)
def test_passes_per_step(name: str) -> None:
    """SAF: 1 forward, 1 backward (the base optimizer's cost); MESA: 2 forwards, 1 backward;
    TRAM: 3 forwards, 2 backwards (SEED_METHODS.md 1b, 2b). UDIM's floor is SAM's two passes (the
    benchmark then reports its cost over SAM's); it runs 4 forwards (x~'s and the one on [x; x~]
    besides SAM's) and 4 backwards through fc1 (SAM's two, grad_w CE for x~'s objective, L_inc's)."""
    model = Net()
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    opt = build_optimizer(name, model.parameters(), lr=LR, **MEMBERS[name])
    x, y = data()
    backwards: list[int] = []
    model.fc1.weight.register_hook(lambda g: backwards.append(1))
    idx = torch.arange(8)
    member_backward(opt, model, [Batch(x[idx], y[idx], idx)])  # bind (MESA's copy is made here)
    opt.step()
    forwards.clear(), backwards.clear()
    member_backward(opt, model, [Batch(x[idx], y[idx], idx)])
    opt.step()
    expected = {"saf": (1, 1), "mesa": (2, 1), "tram-prev": (3, 2), "tram-init": (3, 2), "tram-x": (3, 2),
                "udim": (2, 2)}[name]
    counted = {"udim": (4, 4)}.get(name, expected)  # what runs, where it exceeds the floor
    assert (sum(opt.passes), opt.passes[0]) == expected  # what the benchmark times as the member's floor
    # the copies of the model (MESA's EMA, TRAM's target) are made after the hook, so they carry it
    assert (len(forwards), len(backwards)) == counted


def test_tram_max_radius_caps_d() -> None:
    _, free = run("tram-init", epochs(2))
    _, capped = run("tram-init", epochs(2), {"max_radius": 1e-4})
    assert free.last_radius.item() > 1e-3 and capped.last_radius.item() == pytest.approx(1e-4)
    assert capped.metrics() == {"tram_radius": pytest.approx(1e-4)}  # what samsuite train logs per epoch


def test_saf_buffer_is_n_by_past_plus_one_by_c_and_float16_halves_it() -> None:
    _, opt32 = run("saf", epochs(1))
    _, opt16 = run("saf", epochs(1), {"bank_dtype": "float16"})
    assert opt32._bank.shape == (N, MEMBERS["saf"]["past"] + 1, CLASSES)
    assert opt32.bank_bytes == N * 3 * CLASSES * 4 and opt16.bank_bytes == opt32.bank_bytes // 2
    _, fixed = run("saf", epochs(1), {"num_examples": N})
    assert fixed.bank_bytes == opt32.bank_bytes


def test_saf_term_starts_only_at_start_epoch() -> None:
    """Before start_epoch SAF is its base optimizer, step for step."""
    steps = epochs(2)
    saf, _ = run("saf", steps)
    sgd, _ = run("sgd", steps)
    assert_weights(saf, weights(sgd), atol=0)


def test_tram_x_noises_embeddings_of_token_ids_without_touching_the_inputs() -> None:
    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, IN, dtype=torch.float64)
            self.head = nn.Linear(IN, CLASSES, dtype=torch.float64)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
            h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            return self.head(h.mean(1))

    model = TokenNet()
    opt = build_optimizer("tram-x", model.parameters(), lr=LR, sigma=0.5)
    inputs = {"input_ids": torch.randint(0, 11, (6, 3))}
    before = dict(inputs)
    member_backward(opt, model, [Batch(inputs, torch.randint(0, CLASSES, (6,)))])
    opt.step()
    assert inputs.keys() == before.keys() and inputs["input_ids"] is before["input_ids"]
    assert opt.last_radius.item() > 0


# =========================================================================== bad input
@pytest.mark.parametrize(("name", "options", "field"), [
    ("saf", {"lam": -1.0}, "lam"), ("saf", {"tau": 0.0}, "tau"), ("saf", {"past": 0}, "past"),
    ("saf", {"past": 3, "start_epoch": 2}, "start_epoch"), ("saf", {"end_epoch": 1, "start_epoch": 3}, "end_epoch"),
    ("saf", {"bank_dtype": "int8"}, "bank_dtype"), ("saf", {"num_examples": 0}, "num_examples"),
    ("mesa", {"beta": 1.0}, "beta"), ("mesa", {"beta": -0.1}, "beta"), ("mesa", {"start_step": -1}, "start_step"),
    ("tram-x", {"sigma": 0.0}, "sigma"), ("tram-prev", {"rho": 0.1}, "rho"), ("tram-prev", {"eta": -1.0}, "eta"),
    ("tram-prev", {"target": "ema"}, "target"), ("tram-init", {"max_radius": 0.0}, "max_radius"), ("saf", {"nesterovv": True}, "nesterovv"),
])
def test_bad_options_name_the_field(name: str, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        build_optimizer(name, Net().parameters(), lr=LR, **{**MEMBERS[name], **options})


def test_saf_without_indices_names_the_field() -> None:
    model = Net()
    opt = build_optimizer("saf", model.parameters(), lr=LR)
    x, y = data()
    with pytest.raises(ValueError, match=r"^index: SAF keeps"):
        member_backward(opt, model, [(x, y)])
    with pytest.raises(ValueError, match=r"^index: an example appears twice"):
        member_backward(opt, model, [Batch(x[:2], y[:2], torch.tensor([3, 3]))])
    bounded = build_optimizer("saf", model.parameters(), lr=LR, num_examples=4)
    with pytest.raises(ValueError, match=r"^index: 9 is out of range for num_examples=4"):
        member_backward(bounded, model, [Batch(x[:2], y[:2], torch.tensor([1, 9]))])


def test_tram_x_on_integer_inputs_without_embeddings_names_the_field() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, CLASSES))
    opt = build_optimizer("tram-x", model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"^sigma: tram-x noises"):
        member_backward(opt, model, [Batch(torch.randint(0, 5, (4, 2)), torch.randint(0, CLASSES, (4,)))])


def test_tram_outside_the_driver_is_a_clear_error() -> None:
    model = Net()
    opt = build_optimizer("tram-prev", model.parameters(), lr=LR)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="member_backward"):
        opt.first_step()


def test_table_covers_every_driver_only_member() -> None:
    driver_only = sorted(n for n in OPTIMIZERS.names() if OPTIMIZERS.get(n).driver_only)
    assert sorted(MEMBERS) == driver_only
