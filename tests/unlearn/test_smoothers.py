"""Each smoother's gradient against a float64 reference computed here on the whole batch, while the
smoother sees 2 uneven micro-batches: this catches accumulation that does nothing (the reference
SAM trainer's `.grad` overwrite) and a gradient penalty without gradient (the reference's `.item()`).
Tolerance 1e-6: transformers' LlamaRMSNorm computes in float32 even in a float64 model, so
gradients that are equal in exact arithmetic differ by ~1e-8 (the bugs above give O(1) errors)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_fixtures import FORGET, RETAIN, tiny_llama, tiny_tokenizer

from shared import ASAM, GSAM, SAM
from shared.seeding import derive_seed
from unlearn.data import collate, make_micro_batches, tokenize_texts
from unlearn.objectives import OBJECTIVES, ObjectiveContext, SetupData
from unlearn.smoothers import SMOOTHERS, StepTerms
from unlearn.train import UnlearnConfig

ROWS = [4, 0, 5, 1, 2]
GAMMA = 0.7


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    data = {"forget": tokenize_texts(tok, FORGET, 64), "retain": tokenize_texts(tok, RETAIN, 64)}
    model = tiny_llama(tok)
    return tok, data, model


def make(model, data, smoother: str, **kw):
    """(smoother, optimizer, terms, micro-batch pairs, whole forget batch, whole retain batch) for NPO + retain."""
    cfg = UnlearnConfig(objective="npo", smoother=smoother, gamma=GAMMA, beta=0.2, base_optimizer="sgd", lr=0.1, **kw)
    ctx = ObjectiveContext(cfg)
    objective = OBJECTIVES.get("npo")
    objective.setup(model, ctx, SetupData(data["forget"], data["retain"], tiny_llama_ref(model)))
    terms = StepTerms(lambda p: objective.forget(model, p[0], ctx), lambda p: objective.retain(model, p[1], ctx), GAMMA)
    pairs = list(zip(make_micro_batches(data["forget"], ROWS, 2), make_micro_batches(data["retain"], ROWS, 2)))
    smoother = SMOOTHERS.get(smoother)(cfg)
    opt = smoother.make_optimizer(list(model.parameters()))
    whole = (collate(data["forget"], ROWS), collate(data["retain"], ROWS))
    return smoother, opt, terms, pairs, whole


def tiny_llama_ref(model):
    """A reference model different from `model` (so that NPO's log-ratios are not all zero)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.9)
    return ref


def grads(loss, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def assert_grads(model, expected, atol):
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, rtol=0, atol=atol), (p.grad - e).abs().max()


def test_registry_and_did_you_mean():
    assert SMOOTHERS.names() == ["asam", "gp", "gsam", "none", "rs", "sam", "wa"]
    with pytest.raises(ValueError, match="did you mean 'sam'"):
        SMOOTHERS.get("samm")


def test_none_is_the_plain_gradient(setup):
    _, data, model = setup
    smoother, opt, terms, pairs, whole = make(model, data, "none")
    params = list(model.parameters())
    expected = grads(terms.forget(whole) + GAMMA * terms.retain(whole), params)
    losses = smoother.backward(opt, pairs, terms, step=1)
    assert_grads(model, expected, 1e-12)
    assert losses["forget_loss"].item() == pytest.approx(terms.forget(whole).item(), abs=1e-12)
    assert losses["retain_loss"].item() == pytest.approx(terms.retain(whole).item(), abs=1e-12)


def test_sam_on_the_forget_loss_only_is_exact_under_accumulation(setup):
    """grad = grad l_f(w + e) + gamma grad l_r(w), e = rho g_f/||g_f|| from the whole step's g_f."""
    _, data, model = setup
    rho = 0.05
    smoother, opt, terms, pairs, whole = make(model, data, "sam", rho=rho)
    assert isinstance(opt, SAM) and not isinstance(opt, ASAM)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    g_f = grads(terms.forget(whole), params)
    norm = torch.sqrt(sum((g**2).sum() for g in g_f))
    with torch.no_grad():
        for p, g in zip(params, g_f):
            p.add_(rho * g / norm)
    g_perturbed = grads(terms.forget(whole), params)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    g_r = grads(terms.retain(whole), params)
    expected = [a + GAMMA * b for a, b in zip(g_perturbed, g_r)]
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_perturbed, g_f))  # e matters

    losses = smoother.backward(opt, pairs, terms, step=1)
    assert_grads(model, expected, 1e-6)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # weights restored bit for bit
    assert losses["perturbed_forget_loss"] > losses["forget_loss"]  # the ascent step did ascend
    step_grads = [p.grad.clone() for p in params]
    opt.step()  # the base SGD step (lr 0.1) with that gradient, from the restored weights
    assert all(torch.allclose(p, b - 0.1 * g, rtol=0, atol=1e-15) for p, b, g in zip(params, before, step_grads))
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)


@pytest.mark.parametrize(("name", "cls", "options"), [("asam", ASAM, {"eta": 0.02}), ("gsam", GSAM, {"alpha": 0.2})])
def test_asam_and_gsam_members_take_their_options(setup, name, cls, options):
    _, data, model = setup
    smoother, opt, terms, pairs, _ = make(model, data, name, rho=0.05, sam_options=options)
    assert isinstance(opt, cls)
    key, value = next(iter(options.items()))
    assert opt.param_groups[0][key] == value and opt.param_groups[0]["rho"] == 0.05
    smoother.backward(opt, pairs, terms, step=1)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_randomized_smoothing_averages_the_forget_gradient_over_noise(setup):
    _, data, model = setup
    sigma, samples, step = 1e-2, 3, 7
    smoother, opt, terms, pairs, whole = make(model, data, "rs", sigma=sigma, rs_samples=samples, seed=5)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(derive_seed(5, "rs", step))
    expected = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=sigma)
        for e, g in zip(expected, grads(terms.forget(whole), params)):
            e += g / samples
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
    for e, g in zip(expected, grads(terms.retain(whole), params)):
        e += GAMMA * g
    smoother.backward(opt, pairs, terms, step=step)
    assert_grads(model, expected, 1e-6)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # noise removed exactly
    first = [p.grad.clone() for p in params]
    smoother.backward(opt, pairs, terms, step=step + 1)  # another step draws other noise
    assert not all(torch.allclose(a, p.grad) for a, p in zip(first, params))


def test_gradient_penalty_is_differentiable_and_exact_under_accumulation(setup):
    """grad [l_f + rho ||grad l_f|| + gamma l_r] by double backward on the whole batch (float64)."""
    _, data, model = setup
    rho = 0.3
    smoother, opt, terms, pairs, whole = make(model, data, "gp", rho=rho)
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss_f = terms.forget(whole)
        g = torch.autograd.grad(loss_f, params, create_graph=True)
        penalty = rho * torch.sqrt(sum((x**2).sum() for x in g))
        expected = grads(loss_f + penalty + GAMMA * terms.retain(whole), params)
    plain = grads(terms.forget(whole) + GAMMA * terms.retain(whole), params)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(expected, plain)))
    assert diff > 1e-3  # the penalty's own gradient is far from zero: a `.item()` penalty would fail below
    losses = smoother.backward(opt, pairs, terms, step=1)
    assert_grads(model, expected, 1e-6)
    assert losses["penalty"].item() == pytest.approx(penalty.item(), rel=1e-10)


def test_weight_averaging_running_mean_from_start_every_k():
    cfg = UnlearnConfig(objective="nll", smoother="wa", wa_start=2, wa_every=2)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    smoother = SMOOTHERS.get("wa")(cfg)
    smoother.make_optimizer([w])
    seen = []
    for step in range(1, 8):
        with torch.no_grad():
            w.copy_(torch.tensor([step, step**2, -step], dtype=torch.float64))
        smoother.after_step(step)
        if step in (2, 4, 6):
            seen.append(w.detach().clone())
    state = smoother.state_dict()
    assert state["count"] == 3
    resumed = SMOOTHERS.get("wa")(cfg)
    resumed.make_optimizer([w])
    resumed.load_state_dict(state)
    resumed.finish()
    assert torch.allclose(w, torch.stack(seen).mean(0), atol=1e-12)


@pytest.mark.parametrize("smoother", ["none", "wa"])
def test_an_evaluation_at_step_k_sees_what_a_run_of_k_steps_delivers(smoother):
    """What a calibration of the budget relies on: with a constant lr, evaluating at step k during a
    longer run measures the model a run of k steps ends with (for weight averaging: the average so far,
    not the weights being trained), and the training goes on from its own weights."""
    from unlearn.train import unlearn

    tok = tiny_tokenizer()
    settings = {"objective": "npo", "smoother": smoother, "lr": 1e-2, "batch_size": 2, "max_length": 64,
                "wa_start": 1, "wa_every": 1, "save_every": 0}
    seen = {}

    def eval_fn(model, step):
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {}

    long = tiny_llama(tok)
    unlearn(long, tok, FORGET, RETAIN, UnlearnConfig(**settings, steps=4, eval_every=2), eval_fn=eval_fn)
    short = tiny_llama(tok)
    unlearn(short, tok, FORGET, RETAIN, UnlearnConfig(**settings, steps=2))
    for name, p in short.named_parameters():
        torch.testing.assert_close(seen[2][name], p, rtol=0, atol=0)
    final = dict(long.named_parameters())
    assert all(torch.equal(seen[4][n], final[n]) for n in final)
    assert not all(torch.equal(seen[2][n], final[n]) for n in final)


@pytest.mark.parametrize("smoother", ["none", "wa"])
def test_a_run_stopped_at_step_k_is_a_run_of_k_steps_and_stays_stopped(smoother, tmp_path):
    """What reusing a calibration's model relies on: `stop` ends a constant-lr run at step k with the
    weights a k-step run ends with (weight averaging: its average), and resuming it trains no further."""
    from unlearn.train import unlearn

    tok = tiny_tokenizer()
    settings = {"objective": "npo", "smoother": smoother, "lr": 1e-2, "batch_size": 2, "max_length": 64,
                "wa_start": 1, "wa_every": 1, "save_every": 0}
    asked = []

    def stop(step, values):
        asked.append((step, values))
        return step == 2

    stopped = tiny_llama(tok)
    cfg = UnlearnConfig(**settings, steps=6, eval_every=1)
    summary = unlearn(stopped, tok, FORGET, RETAIN, cfg, eval_fn=lambda m, s: {"v": float(s)}, stop=stop,
                      run_dir=tmp_path / "run")
    assert asked == [(1, {"v": 1.0}), (2, {"v": 2.0})] and summary["steps"] == 2 and summary["stopped"] is True
    short = tiny_llama(tok)
    assert unlearn(short, tok, FORGET, RETAIN, UnlearnConfig(**settings, steps=2))["stopped"] is False
    for name, p in short.named_parameters():
        torch.testing.assert_close(dict(stopped.named_parameters())[name], p, rtol=0, atol=0)
    again = tiny_llama(tok)
    resumed = unlearn(again, tok, FORGET, RETAIN, cfg, eval_fn=lambda m, s: {"v": float(s)}, stop=stop,
                      run_dir=tmp_path / "run")
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 2 and resumed["stopped"] is True
    for name, p in short.named_parameters():
        torch.testing.assert_close(dict(again.named_parameters())[name], p, rtol=0, atol=0)
