"""GAQAT: the disorder and the freezing decision on scripted gradients, the descent of frozen and
free step sizes against a float64 reference of the formula, state round trip, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import Batch, build_optimizer, member_backward
from shared.quant import QuantScale
from shared.sam.gaqat import GAQAT, gradient_disorder

RHO, ALPHA, LR = 0.05, 0.01, 0.1


class ScaledNet(nn.Module):
    """A linear layer whose input and output go through two step-size-like parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(4, 3).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
        self.s_in = QuantScale(torch.tensor(0.7, dtype=torch.float64))
        self.s_out = QuantScale(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(x * self.s_in)) * self.s_out


def batch(step: int) -> Batch:
    gen = torch.Generator().manual_seed(100 + step)
    return Batch(torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))


def test_disorder_is_the_fraction_of_sign_flips() -> None:
    signs = torch.tensor([[1, 1, -1], [1, -1, -1], [1, 1, 1], [1, -1, 1]], dtype=torch.int8)
    torch.testing.assert_close(gradient_disorder(signs), torch.tensor([0.0, 1.0, 1 / 3]))


def test_scripted_gradients_freeze_the_steady_scale_for_good() -> None:
    opt = GAQAT(ScaledNet().parameters(), window=4, interval=2, threshold=0.5, lr=LR)
    steady, flipping = 1.0, 1.0
    masks = []
    for step in range(8):
        flipping = -flipping
        if step >= 4:
            steady = -steady  # the steady scale starts to flip too: it stays frozen (no unfreezing)
        masks.append(opt._record(torch.tensor([steady, flipping], dtype=torch.float64)).tolist())
    assert masks[:3] == [[0.0, 0.0]] * 3  # fewer than `window` steps recorded: no decision
    assert masks[3] == [1.0, 0.0]  # step 4: disorder 0 (steady) < 0.5 <= 1 (flipping)
    assert masks[4:] == [[1.0, 0.0]] * 4
    assert opt.metrics() == {"gaqat_frozen_fraction": 0.5}


def reference_step(model: ScaledNet, b: Batch, frozen: list[float]) -> list[Tensor]:
    """SAGM on every parameter, float64: e = (rho/||g|| - alpha) g, d = (g + g_p)/2; a frozen step
    size descends along (g_p - g)/2 alone. Returns the descent gradients in parameter order."""
    params = list(model.parameters())

    def grads() -> list[Tensor]:
        return list(torch.autograd.grad(F.cross_entropy(model(b.inputs), b.targets), params))

    g = grads()
    norm = math.sqrt(sum(float((t * t).sum()) for t in g))
    e = [(RHO / (norm + 1e-12) - ALPHA) * t for t in g]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    gp = grads()
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
    out = [(a + c) / 2 for a, c in zip(g, gp)]
    scales = [i for i, p in enumerate(params) if isinstance(p, QuantScale)]
    for i, f in zip(scales, frozen):
        if f:
            out[i] = (gp[i] - g[i]) / 2
    return out


@pytest.mark.parametrize("frozen", [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
def test_descent_matches_the_formula(frozen: list[float]) -> None:
    model, reference = ScaledNet(), ScaledNet()
    opt = GAQAT(model.parameters(), rho=RHO, alpha=ALPHA, window=50, interval=50, lr=LR)
    opt.load_member_state({"signs": torch.zeros(50, 2, dtype=torch.int8), "frozen": torch.tensor(frozen,
                                                                                                 dtype=torch.float64),
                           "recorded": 1})
    b = batch(0)
    expected = reference_step(reference, b, frozen)
    member_backward(opt, model, [b])
    for p, d in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, d, atol=1e-12, rtol=0)


def test_state_round_trip_continues_exactly() -> None:
    def make() -> tuple[ScaledNet, GAQAT]:
        model = ScaledNet()
        return model, GAQAT(model.parameters(), window=3, interval=1, threshold=0.6, lr=LR)

    model, opt = make()
    for step in range(4):
        member_backward(opt, model, [batch(step)])
        opt.step()
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    for step in range(4, 8):
        member_backward(opt, model, [batch(step)])
        opt.step()
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for step in range(4, 8):
        member_backward(opt2, resumed, [batch(step)])
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert torch.equal(opt.frozen, opt2.frozen) and opt._recorded == opt2._recorded == 8


def test_without_step_sizes_it_is_sagm_and_says_so() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(4, 3).double()
    other = nn.Linear(4, 3).double()
    other.load_state_dict(plain.state_dict())
    gaqat = GAQAT(plain.parameters(), rho=RHO, alpha=ALPHA, lr=LR)
    sagm = build_optimizer("sagm", other.parameters(), rho=RHO, alpha=ALPHA, lr=LR)
    with pytest.warns(UserWarning, match="LSQ step size"):
        member_backward(gaqat, plain, [batch(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        member_backward(sagm, other, [batch(0)])
    gaqat.step(), sagm.step()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), other.parameters()))


@pytest.mark.parametrize(("options", "message"), [
    ({"window": 1}, "window: expected an integer >= 2"),
    ({"window": 2.5}, "window: expected an integer >= 2"),
    ({"interval": 0}, "interval: expected an integer >= 1"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"alpha": -1.0}, "alpha"),
])
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GAQAT(ScaledNet().parameters(), lr=LR, **options)
