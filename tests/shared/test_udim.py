"""UDIM (Shin et al., ICLR 2024) against float64 references written here in plain code: the per-example
head gradients, the perturbed inputs x~, R_var and R_norm, the whole step's gradient; then the warm-up,
batch norm, the caller's inputs and bad input. The contract checks shared by every driver-only member
(resume, AdamW + scheduler, bf16, passes) run it from test_driver_members.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import OPTIMIZERS, Batch, build_optimizer, chunk, member_backward
from shared.sam import UDIM
from shared.sam.udim import find_head, inconsistency_terms, per_example_head_grads, perturbed_inputs
from tests.shared.test_driver_members import Net  # the same 2-layer net, float64

IN, HIDDEN, CLASSES, N = 5, 7, 4, 12
LR, RHO, RHO_X, LAM = 0.1, 0.05, 0.5, 1.0
ATOL = 1e-10


def features(ws: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, _, _ = ws
    return torch.tanh(x @ w1.T + b1)


def functional(ws: list[Tensor], x: Tensor) -> Tensor:
    return features(ws, x) @ ws[2].T + ws[3]


def data(n: int = N, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=gen)


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def leaves(ws: list[Tensor]) -> list[Tensor]:
    return [w.detach().clone().requires_grad_(True) for w in ws]


def grads(ws: list[Tensor], loss_fn: Callable[[list[Tensor]], Tensor]) -> list[Tensor]:
    ls = leaves(ws)
    return list(torch.autograd.grad(loss_fn(ls), ls))


def udim(model: nn.Module, **options: Any) -> UDIM:
    opts = {"rho": RHO, "rho_x": RHO_X, "lam": LAM, **options}
    return build_optimizer("udim", model.parameters(), lr=LR, **opts)  # type: ignore[return-value]


# =========================================================================== the references
def reference_x_tilde(ws: list[Tensor], x: Tensor, y: Tensor, rho_x: float, rho_s: float) -> Tensor:
    """d = grad_x [CE + rho_s ||grad_w CE||] by plain autograd, then each example moved by rho_x along its own d_i."""
    x_r = x.clone().requires_grad_(True)
    ls = leaves(ws)
    loss = F.cross_entropy(functional(ls, x_r), y)
    g = torch.autograd.grad(loss, ls, create_graph=True)
    objective = loss + rho_s * torch.sqrt(sum((gi * gi).sum() for gi in g))
    (d,) = torch.autograd.grad(objective, x_r)
    return torch.stack([x[i] + rho_x * d[i] / d[i].norm() for i in range(len(x))])


def closed_form_head_grads(h: Tensor, z: Tensor, y: Tensor) -> list[Tensor]:
    """G_i,W = (softmax(z_i) - onehot(y_i)) h_i^T and G_i,b = softmax(z_i) - onehot(y_i), flattened."""
    r = torch.softmax(z, -1) - F.one_hot(y, z.shape[-1]).to(z)
    return [(r[:, :, None] * h[:, None, :]).reshape(len(h), -1), r]


def reference_terms(src: list[Tensor], syn: list[Tensor]) -> tuple[Tensor, Tensor]:
    """R_var and R_norm written element by element: k runs over W's and b's entries together."""
    v_src, v_syn = [], []
    r_norm = torch.zeros((), dtype=torch.float64)
    for g, gs in zip(src, syn):
        b, dim = g.shape
        for k in range(dim):
            mean = sum(g[i, k] for i in range(b)) / b
            v_src.append(sum((g[i, k] - mean) ** 2 for i in range(b)) / b)
            v_syn.append(sum((gs[i, k] - mean) ** 2 for i in range(len(gs))) / len(gs))  # the source mean
        r_norm = r_norm + sum(sum(gs[i, k] ** 2 for k in range(dim)) for i in range(len(gs))) / len(gs) / dim
    total = len(v_src)
    r_var = sum(((a - (a + c) / 2) ** 2 + (c - (a + c) / 2) ** 2) for a, c in zip(v_src, v_syn)) / total / 2
    return r_var, r_norm


def reference_inconsistency(ws: list[Tensor], x: Tensor, x_tilde: Tensor, y: Tensor) -> Tensor:
    """L_inc = R_var + R_norm at `ws` (differentiable), per-example gradients in closed form."""
    both, y2 = torch.cat([x, x_tilde]), torch.cat([y, y])
    h = features(ws, both)
    g = closed_form_head_grads(h, h @ ws[2].T + ws[3], y2)
    r_var, r_norm = reference_terms([t[: len(x)] for t in g], [t[len(x):] for t in g])
    return r_var + r_norm


def reference_step_grad(ws: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                        perturbed: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    """(SAM's gradient over the micro-batches, e from their mean gradient on the perturbed tensors only;
    lam times the mean over micro-batches of grad_w L_inc at w)."""
    k = len(batches)

    def mean_loss(w: list[Tensor]) -> Tensor:
        return sum(F.cross_entropy(functional(w, xb), yb) for xb, yb in batches) / k

    g = grads(ws, mean_loss)
    norm = torch.sqrt(sum((gi * gi).sum() for gi, p in zip(g, perturbed) if p))
    moved = [w + RHO * gi / (norm + 1e-12) if p else w for w, gi, p in zip(ws, g, perturbed)]
    term = [torch.zeros_like(w) for w in ws]
    for xb, yb in batches:
        x_tilde = reference_x_tilde(ws, xb, yb, RHO_X, RHO)
        g_inc = grads(ws, lambda w, xb=xb, yb=yb, xt=x_tilde: reference_inconsistency(w, xb, xt, yb))
        term = [t + LAM * gi / k for t, gi in zip(term, g_inc)]
    return grads(moved, mean_loss), term


# =========================================================================== the formulas
def test_per_example_head_grads_match_the_closed_form_and_a_loop() -> None:
    """torch.func's per-example gradients equal (softmax(z_i) - onehot(y_i)) h_i^T and its bias part,
    and a loop of one backward per example; they stay differentiable in h and in the head."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(HIDDEN, CLASSES, dtype=torch.float64)
    h = torch.randn(6, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, CLASSES, (6,), generator=gen)
    got = per_example_head_grads(head, h, y)
    want = closed_form_head_grads(h, head(h), y)
    assert [t.shape for t in got] == [(6, CLASSES * HIDDEN), (6, CLASSES)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for i in range(6):
        loop = torch.autograd.grad(F.cross_entropy(head(h[i : i + 1]), y[i : i + 1]), [head.weight, head.bias])
        for a, b in zip(got, loop):
            torch.testing.assert_close(a[i], b.reshape(-1), atol=1e-12, rtol=0)
    # second order: a function of the per-example gradients differentiates as the closed form's does
    def probe(gs: list[Tensor]) -> Tensor:
        return sum((t**2).sum() + t.sum() ** 3 for t in gs)

    d_got = torch.autograd.grad(probe(got), [h, head.weight, head.bias])
    d_want = torch.autograd.grad(probe(want), [h, head.weight, head.bias])
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        assert a.abs().max() > 1e-6


@pytest.mark.parametrize("rho_s", [RHO, 0.0, 0.7])
def test_x_tilde_moves_each_example_by_rho_x_along_its_own_input_gradient(rho_s: float) -> None:
    model = Net()
    x, y = data()
    got = perturbed_inputs(model, x, y, RHO_X, rho_s)
    want = reference_x_tilde(weights(model), x, y, RHO_X, rho_s)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # every example moves by rho_x (the reference code's F.normalize(dim=0) normalises each input
    # coordinate across the batch instead, so an example's step depends on the others)
    torch.testing.assert_close((got - x).norm(dim=1), torch.full((N,), RHO_X, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not got.requires_grad


def test_r_var_and_r_norm_match_the_hand_written_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)]
    syn = [torch.randn(5, 6, generator=gen, dtype=torch.float64) + 0.5, 2 * torch.randn(5, 2, generator=gen,
                                                                                      dtype=torch.float64)]
    r_var, r_norm = inconsistency_terms(src, syn)
    want_var, want_norm = reference_terms(src, syn)
    torch.testing.assert_close(r_var, want_var, atol=1e-12, rtol=0)
    torch.testing.assert_close(r_norm, want_norm, atol=1e-12, rtol=0)
    assert r_var > 1e-3 and r_norm > 1e-3
    # equal distributions around the source mean give R_var = 0; R_norm is then the source's
    r_var, r_norm = inconsistency_terms(src, src)
    assert r_var == 0
    torch.testing.assert_close(r_norm, reference_terms(src, src)[1], atol=1e-12, rtol=0)


def test_inconsistency_terms_keep_float32_under_bfloat16() -> None:
    src = [torch.randn(4, 3).bfloat16()]
    r_var, r_norm = inconsistency_terms(src, [2 * src[0]])
    assert r_var.dtype == r_norm.dtype == torch.float32


# =========================================================================== the whole step
@pytest.mark.parametrize(("k", "exclude_biases"), [(1, False), (1, True), (2, False)])
def test_step_gradient_is_sam_plus_lam_grad_of_the_inconsistency_loss(k: int, exclude_biases: bool) -> None:
    """.grad after member_backward = SAM's gradient + lam grad_w L_inc(w) (the mean over k micro-batches
    of their own terms: R_var is a variance over the micro-batch); biases with perturb=False are not
    perturbed but still get the term's gradient."""
    model = Net()
    if exclude_biases:
        params: Any = [{"params": [model.fc1.weight, model.fc2.weight]},
                       {"params": [model.fc1.bias, model.fc2.bias], "perturb": False}]
        perturbed = [True, False, True, False]
    else:
        params, perturbed = model.parameters(), [True] * 4
    opt = build_optimizer("udim", params, lr=LR, rho=RHO, rho_x=RHO_X, lam=LAM)
    x, y = data()
    micro = chunk(Batch(x, y), N // k)
    ws = weights(model)
    sam, term = reference_step_grad(ws, [(b.inputs, b.targets) for b in micro], perturbed)
    want = [a + b for a, b in zip(sam, term)]
    member_backward(opt, model, micro)
    for i, (p, w) in enumerate(zip(model.parameters(), want)):
        torch.testing.assert_close(p.grad, w, atol=ATOL, rtol=0, msg=lambda m, i=i: f"tensor {i}: {m}")
    assert min(t.abs().max().item() for t in term) > 1e-4  # the term reaches every tensor, the first layer too
    opt.step()
    for p, w, g in zip(model.parameters(), ws, want):
        torch.testing.assert_close(p.detach(), w - LR * g, atol=ATOL, rtol=0)


def test_rho_s_defaults_to_rho_and_head_to_the_last_linear() -> None:
    model = Net()
    assert udim(model, rho=0.2).rho_s == 0.2 and udim(model, rho=0.2, rho_s=0.0).rho_s == 0.0
    assert find_head(model) is model.fc2 and find_head(model, "fc1") is model.fc1
    assert type(build_optimizer("UDIM", model.parameters())) is UDIM and OPTIMIZERS.get("udim") is UDIM
    defaults = build_optimizer("udim", model.parameters())
    assert (defaults.rho_x, defaults.rho_s, defaults.lam, defaults.warmup_steps) == (0.005, 0.05, 0.5, 0)
    assert defaults.passes == (2, 0) and UDIM.driver_only


def test_named_head_gives_the_same_step_as_the_default() -> None:
    x, y = data()
    runs = []
    for head in (None, "fc2"):
        model = Net()
        opt = udim(model, head=head)
        member_backward(opt, model, [Batch(x, y)])
        opt.step()
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# =========================================================================== warm-up and state
def run(name: str, steps: int, model: nn.Module | None = None, opt: Any = None, **options: Any) -> tuple[nn.Module, Any]:
    x, y = data()
    model = model or Net(bn=True)
    if opt is None:
        opts = {"rho": RHO} if name == "sam" else {"rho": RHO, "rho_x": RHO_X, "lam": LAM, **options}
        opt = build_optimizer(name, model.parameters(), lr=LR, momentum=0.9, **opts)
    for t in range(steps):
        idx = torch.arange(t % 3 * 4, t % 3 * 4 + 4)
        member_backward(opt, model, [Batch(x[idx], y[idx])])
        opt.step()
    return model, opt


def test_warmup_steps_are_sam_steps_then_the_term_applies() -> None:
    for steps in (1, 2):
        sam, _ = run("sam", steps)
        warm, opt = run("udim", steps, warmup_steps=2)
        for a, b in zip(weights(warm), weights(sam)):
            assert torch.equal(a, b)
        assert opt.member_state() == {"steps": steps}
    sam, _ = run("sam", 3)
    warm, _ = run("udim", 3, warmup_steps=2)
    assert max((a - b).abs().max().item() for a, b in zip(weights(warm), weights(sam))) > 1e-6


def test_resume_inside_the_warmup_repeats_the_uninterrupted_run() -> None:
    """The step counter is part of the state: stopped after 1 of 2 warm-up steps and resumed, the term
    starts at step 3 as without the stop (a counter reset to 0 would delay it)."""
    whole, _ = run("udim", 4, warmup_steps=2)
    half, opt = run("udim", 1, warmup_steps=2)
    state = opt.state_dict()
    assert state["member"] == {"steps": 1}
    model = Net(bn=True, seed=7)
    model.load_state_dict(half.state_dict())
    fresh = build_optimizer("udim", model.parameters(), lr=LR, momentum=0.9, rho=RHO, rho_x=RHO_X, lam=LAM,
                            warmup_steps=2)
    fresh.load_state_dict(state)
    x, y = data()
    for t in range(1, 4):
        idx = torch.arange(t % 3 * 4, t % 3 * 4 + 4)
        member_backward(fresh, model, [Batch(x[idx], y[idx])])
        fresh.step()
    for a, b in zip(weights(model), weights(whole)):
        assert torch.equal(a, b)


# =========================================================================== batch norm and inputs
def test_bn_statistics_equal_a_sam_step_and_the_inputs_are_untouched() -> None:
    """UDIM's extra forwards (x~'s, and [x; x~]) update no running statistic: after one step from the
    same weights on the same batch, every BN buffer equals SAM's; BN modules keep their statistics
    (the reference code strips them); the caller's inputs are neither changed nor made to need grad."""
    x, y = data()
    sam_model, udim_model = Net(bn=True), Net(bn=True)
    for model, name in ((sam_model, "sam"), (udim_model, "udim")):
        opt = build_optimizer(name, model.parameters(), lr=LR, rho=RHO, **({"rho_x": RHO_X} if name == "udim" else {}))
        xb, before, version = x.clone(), x.clone(), x._version
        member_backward(opt, model, [Batch(xb, y)])
        opt.step()
        assert torch.equal(xb, before) and xb._version == version and not xb.requires_grad
    for (name, a), (_, b) in zip(sam_model.named_buffers(), udim_model.named_buffers()):
        assert torch.equal(a, b), name
    # x~'s own forward freezes them too, outside the driver's frozen anchor
    buffers = [t.clone() for t in udim_model.buffers()]
    perturbed_inputs(udim_model, x, y, RHO_X, RHO)
    assert all(torch.equal(a, b) for a, b in zip(udim_model.buffers(), buffers))
    # and so does the whole term called outside the driver (its forward on [x; x~])
    build_optimizer("udim", udim_model.parameters(), lr=LR).anchor_loss(udim_model, Batch(x, y)).backward()
    assert all(torch.equal(a, b) for a, b in zip(udim_model.buffers(), buffers))
    assert isinstance(udim_model.bn, nn.BatchNorm1d) and udim_model.bn.running_mean is not None
    assert udim_model.bn.num_batches_tracked.item() == 1 and udim_model.bn.track_running_stats
    # and UDIM did change the step
    assert not torch.equal(sam_model.fc1.weight, udim_model.fc1.weight)


def test_digits_cnn_with_batch_norm_trains_finite() -> None:
    from shared.models import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    opt = build_optimizer("udim", model.parameters(), lr=0.05, rho_x=0.5)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        stats = member_backward(opt, model, [Batch(x, y)])
        opt.step()
    assert math.isfinite(stats.loss.item()) and all(torch.isfinite(p).all() for p in model.parameters())


# =========================================================================== bad input
@pytest.mark.parametrize(("options", "field"), [
    ({"rho": 0.0}, "rho"), ({"rho": math.nan}, "rho"),
    ({"rho_x": 0.0}, "rho_x"), ({"rho_x": -1.0}, "rho_x"), ({"rho_x": math.inf}, "rho_x"), ({"rho_x": "a"}, "rho_x"),
    ({"rho_s": -0.1}, "rho_s"), ({"rho_s": math.nan}, "rho_s"),
    ({"lam": 0.0}, "lam"), ({"lam": -1.0}, "lam"), ({"lam": math.inf}, "lam"), ({"lam": None}, "lam"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"warmup_steps": True}, "warmup_steps"), ({"warmup_steps": "3"}, "warmup_steps"),
    ({"head": ""}, "head"), ({"head": 3}, "head"), ({"momentumm": 0.9}, "momentumm"),
])
def test_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        build_optimizer("udim", Net().parameters(), lr=LR, **options)


def test_a_model_without_a_linear_head_names_the_field() -> None:
    model = nn.Sequential(nn.Conv1d(1, 3, 1), nn.Flatten())
    opt = build_optimizer("udim", model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"^head: .*has no Linear module"):
        member_backward(opt, model, [Batch(torch.randn(4, 1, 1), torch.randint(0, 3, (4,)))])


def test_a_head_that_is_not_a_linear_module_names_the_field_and_the_linears() -> None:
    x, y = data()
    for head in ("bn", "fc3"):
        model = Net(bn=True)
        opt = udim(model, head=head)
        with pytest.raises(ValueError, match=rf"^head: '{head}' is not a Linear module.*'fc1', 'fc2'"):
            member_backward(opt, model, [Batch(x, y)])
    model = Net()
    opt = udim(model, head="fc1")  # a Linear, but its output is not the logits
    with pytest.raises(ValueError, match=r"^head: UDIM takes the logits to be the output of the head \('fc1'\)"):
        member_backward(opt, model, [Batch(x, y)])


def test_integer_inputs_name_the_field() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, CLASSES))
    opt = build_optimizer("udim", model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"^rho_x: UDIM perturbs the inputs.*torch.int64.*token ids"):
        member_backward(opt, model, [Batch(torch.randint(0, 5, (4, 2)), torch.randint(0, CLASSES, (4,)))])


def test_keyword_inputs_name_the_field() -> None:
    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, CLASSES)

        def forward(self, input_ids: Tensor) -> Tensor:
            return self.head(self.embed(input_ids).mean(1))

    model = TokenNet()
    opt = build_optimizer("udim", model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"^rho_x: .*not a dict"):
        member_backward(opt, model, [Batch({"input_ids": torch.randint(0, 5, (4, 2))}, torch.randint(0, CLASSES, (4,)))])
