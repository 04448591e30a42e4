"""shared.quant (LSQ): the quantizer's forward and both gradients against a float64 reference of the
formulas, the init and g, the quantized layers against the float layer on fake-quantized tensors,
quantize_model's replacements, state and type round trips, a few training steps, bad input."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.quant import (
    LSQQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantScale,
    lsq_quantize,
    quant_scales,
    quantize_model,
)

SIGNED_3BIT, UNSIGNED_3BIT = (4, 3), (0, 7)


def reference(v: Tensor, s: float, q_n: int, q_p: int, g: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per element, in float64 Python: v_hat, d v_hat / d v and d v_hat / d s (the paper's formulas)."""
    out, dv, ds = [], [], []
    for x in v.double().tolist():
        r = x / s
        if r <= -q_n:
            out.append(-q_n * s), dv.append(0.0), ds.append(-q_n * g)
        elif r >= q_p:
            out.append(q_p * s), dv.append(0.0), ds.append(q_p * g)
        else:
            k = round(r)  # half to even, as torch.round
            out.append(k * s), dv.append(1.0), ds.append((k - r) * g)
    return (torch.tensor(out, dtype=torch.float64), torch.tensor(dv, dtype=torch.float64),
            torch.tensor(ds, dtype=torch.float64))


def sample(n: int = 40, seed: int = 0) -> Tensor:
    return 3 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("q_range", [SIGNED_3BIT, UNSIGNED_3BIT], ids=["signed", "unsigned"])
def test_lsq_quantize_forward_and_both_gradients_match_the_formulas(q_range: tuple[int, int]) -> None:
    q_n, q_p, s, g = *q_range, 0.61, 0.37
    v = sample()
    out, dv, ds = reference(v, s, q_n, q_p, g)
    assert {"inside", "below", "above"} <= {
        "below" if x / s <= -q_n else "above" if x / s >= q_p else "inside" for x in v.tolist()
    }
    jac_v, jac_s = torch.autograd.functional.jacobian(
        lambda v, s: lsq_quantize(v, s, q_n, q_p, g), (v, torch.tensor(s, dtype=torch.float64))
    )
    torch.testing.assert_close(lsq_quantize(v, torch.tensor(s, dtype=torch.float64), q_n, q_p, g), out)
    torch.testing.assert_close(jac_v, torch.diag(dv))
    torch.testing.assert_close(jac_s, ds)


def test_lsq_quantize_computes_in_the_input_dtype() -> None:
    v = sample().float()
    scale = torch.tensor(0.61, requires_grad=True)
    out = lsq_quantize(v, scale, *SIGNED_3BIT, 0.37)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(v, 0.61, *SIGNED_3BIT, 0.37)[0].float())
    low = lsq_quantize(v.bfloat16(), scale, *SIGNED_3BIT, 0.37)
    low.sum().backward()
    assert low.dtype == torch.bfloat16 and scale.grad is not None and scale.grad.dtype == torch.float32


def test_torchs_learnable_fake_quant_differs_only_in_the_half_steps_beyond_the_range() -> None:
    """What the module docstring says of torch's private LSQ+-style op at zero point 0, element by element."""
    q_n, q_p, s, g = 4, 3, 0.61, 0.37
    v = sample(400).float()
    jac_v, jac_s = torch.autograd.functional.jacobian(
        lambda v, s: torch._fake_quantize_learnable_per_tensor_affine(v, s, torch.zeros(1), -q_n, q_p, g),
        (v, torch.tensor([s])),
    )
    out, dv, ds = reference(v, s, q_n, q_p, g)
    r = v.double() / s
    band = ((r > -q_n - 0.5) & (r < -q_n)) | ((r > q_p) & (r < q_p + 0.5))
    assert 0 < band.sum() < len(v)
    torch.testing.assert_close(lsq_quantize(v, torch.tensor(s), q_n, q_p, g), out.float())
    torch.testing.assert_close(torch._fake_quantize_learnable_per_tensor_affine(
        v, torch.tensor([s]), torch.zeros(1), -q_n, q_p, g), out.float())
    torch.testing.assert_close(torch.diagonal(jac_v)[~band], dv[~band].float())
    torch.testing.assert_close(jac_s[~band, 0], ds[~band].float())
    assert (torch.diagonal(jac_v)[band] == 1).all() and dv[band].eq(0).all()
    torch.testing.assert_close(jac_s[band, 0], ((r.round() - r) * g)[band].float())


def backward_scale_grad(quantizer: LSQQuantizer, v: Tensor) -> Tensor:
    quantizer(v).sum().backward()
    return quantizer.scale.grad


def test_weight_quantizer_init_and_grad_scale() -> None:
    w = sample(30).reshape(6, 5)
    quantizer = LSQQuantizer(4, signed=True, per_example=False, dtype=torch.float64)
    grad = backward_scale_grad(quantizer, w)
    s = 2 * w.abs().mean().item() / math.sqrt(7)
    assert quantizer.scale.item() == pytest.approx(s, rel=1e-12)
    assert quantizer.q_range == (8, 7)
    assert grad.item() == pytest.approx(reference(w.flatten(), s, 8, 7, 1 / math.sqrt(30 * 7))[2].sum().item())


@pytest.mark.parametrize("positive", [True, False], ids=["after-relu", "signed-data"])
def test_activation_quantizer_init_grad_scale_and_signedness(positive: bool) -> None:
    x = sample(40).reshape(4, 2, 5)
    x = x.relu() if positive else x
    quantizer = LSQQuantizer(3, dtype=torch.float64)
    grad = backward_scale_grad(quantizer, x)
    q_n, q_p = UNSIGNED_3BIT if positive else SIGNED_3BIT
    s = 2 * x.abs().mean().item() / math.sqrt(q_p)
    assert quantizer.q_range == (q_n, q_p) and bool(quantizer.is_signed) is not positive
    assert quantizer.scale.item() == pytest.approx(s, rel=1e-12)
    g = 1 / math.sqrt(10 * q_p)  # 10 elements per example
    assert grad.item() == pytest.approx(reference(x.flatten(), s, q_n, q_p, g)[2].sum().item())
    levels = quantizer(x) / quantizer.scale
    assert torch.allclose(levels, levels.round()) and levels.round().min() >= -q_n and levels.round().max() <= q_p
    quantizer(10 * x)  # later tensors do not re-initialise it
    assert quantizer.scale.item() == pytest.approx(s, rel=1e-12)


def test_an_all_zero_first_tensor_starts_the_scale_at_eps() -> None:
    quantizer = LSQQuantizer(4)
    assert torch.equal(quantizer(torch.zeros(2, 3)), torch.zeros(2, 3))
    assert quantizer.scale.item() == torch.finfo(torch.float32).eps


def test_fixed_signedness_is_kept_whatever_the_data() -> None:
    unsigned, signed = LSQQuantizer(3, signed=False), LSQQuantizer(3, signed=True)
    x = sample().float()
    assert unsigned(x).min() == 0 and unsigned.q_range == UNSIGNED_3BIT
    signed(x.abs())
    assert signed.q_range == SIGNED_3BIT


def fake_quant(v: Tensor, bits: int, signed: bool) -> Tensor:
    """The forward pass of a freshly initialised quantizer, written from the formulas."""
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = 2 * v.abs().mean() / math.sqrt(q_p)
    return (v / s).clamp(-q_n, q_p).round() * s


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="circular"), QuantConv1d, (5, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), QuantConv2d,
               (5, 4, 7, 7)),
    "linear": (lambda: nn.Linear(6, 3), QuantLinear, (5, 2, 6)),
}


@pytest.mark.parametrize("positive", [True, False], ids=["after-relu", "signed-input"])
@pytest.mark.parametrize("kind", LAYERS)
def test_quant_layer_is_the_float_layer_on_fake_quantized_weight_and_input(kind: str, positive: bool) -> None:
    make, cls, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    x = x.relu() if positive else x
    quant = cls.from_float(layer, bits=3, act_bits=4)
    assert type(quant) is cls and quant.weight is not layer.weight and torch.equal(quant.weight, layer.weight)
    assert quant.weight_quantizer.scale.dtype == torch.float64
    params = {"weight": fake_quant(layer.weight.detach(), 3, signed=True), "bias": layer.bias.detach()}
    expected = torch.func.functional_call(layer, params, (fake_quant(x, 4, signed=not positive),))
    torch.testing.assert_close(quant(x), expected)


class Net(nn.Module):
    """conv1 -> conv2 -> pool -> fc1 -> fc2, on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


LAYER_NAMES = ["conv1", "conv2", "fc1", "fc2"]


def images(seed: int, n: int = 32) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def bits_of(layer: nn.Module) -> tuple[int, int]:
    return layer.weight_quantizer.bits, layer.input_quantizer.bits


def test_at_8_bits_the_quantized_model_is_close_to_the_float_one() -> None:
    float_model, x = net(), images(0)
    errors = {}
    for bits in (8, 4):
        quantized = quantize_model(copy.deepcopy(float_model), bits, first_last_bits=bits)
        errors[bits] = ((quantized(x) - float_model(x)).norm() / float_model(x).norm()).item()
    assert errors[8] < 0.05 and errors[8] < errors[4] / 2


def test_quantize_model_replaces_every_layer_first_and_last_at_first_last_bits() -> None:
    float_model = net()
    model = quantize_model(copy.deepcopy(float_model), 4, act_bits=3)
    assert [type(getattr(model, n)) for n in LAYER_NAMES] == [QuantConv2d, QuantConv2d, QuantLinear, QuantLinear]
    assert [bits_of(getattr(model, n)) for n in LAYER_NAMES] == [(8, 8), (4, 3), (4, 3), (8, 8)]
    for name in LAYER_NAMES:
        assert torch.equal(getattr(model, name).weight, getattr(float_model, name).weight)
    kept = quantize_model(net(), 2, first_last_bits=None)
    assert [type(getattr(kept, n)) for n in LAYER_NAMES] == [nn.Conv2d, QuantConv2d, QuantLinear, nn.Linear]
    assert bits_of(kept.conv2) == (2, 2)
    conv1d = quantize_model(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv1d(3, 3, 3), nn.Flatten(), nn.Linear(6, 2)), 4)
    assert [type(m) for m in conv1d] == [QuantConv1d, QuantConv1d, nn.Flatten, QuantLinear]


def test_quantize_model_replaces_a_shared_layer_everywhere_and_only_exact_classes() -> None:
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({
        "a": nn.Linear(4, 4), "b": nn.Sequential(shared, nn.ReLU()), "c": nn.Sequential(shared),
        "attn": nn.MultiheadAttention(4, 1), "z": nn.Linear(4, 4),
    })
    quantize_model(model, 4)
    assert isinstance(model["b"][0], QuantLinear) and model["b"][0] is model["c"][0]
    assert bits_of(model["b"][0]) == (4, 4) and bits_of(model["a"]) == bits_of(model["z"]) == (8, 8)
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_a_float_checkpoint_loads_with_only_the_quantizer_keys_missing() -> None:
    model, pretrained = quantize_model(net(0), 4), net(1)
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {
        f"{layer}.{q}.{key}"
        for layer in LAYER_NAMES
        for q in ("weight_quantizer", "input_quantizer")
        for key in ("scale", "initialized", "is_signed")
    }
    for name in LAYER_NAMES:
        assert torch.equal(getattr(model, name).bias, getattr(pretrained, name).bias)


def test_a_state_dict_round_trip_restores_scales_initialisation_and_signedness() -> None:
    model = quantize_model(net(0), 4)
    model(images(0).abs())  # nonnegative first batch: conv1's input quantizer is unsigned
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = quantize_model(net(1), 4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.conv1.input_quantizer.q_range == (0, 255)
    x = images(1)  # signed: a fresh quantizer would decide otherwise, and re-initialise from it
    assert torch.equal(resumed(x), model(x))
    for (name, a), (_, b) in zip(quant_scales(resumed), quant_scales(model), strict=True):
        assert torch.equal(a, b), name


def assert_scales_kept(model: nn.Module) -> None:
    scales = [p for _, p in quant_scales(model)]
    assert len(scales) == 8 and all(type(p) is QuantScale for p in scales)
    assert sum(isinstance(p, QuantScale) for p in model.parameters()) == 8


def test_deepcopy_to_pickle_and_load_state_dict_keep_quant_scales() -> None:
    model = quantize_model(net(), 4)
    model(images(0))
    assert [name for name, _ in quant_scales(model)] == [
        f"{layer}.{q}.scale" for layer in LAYER_NAMES for q in ("weight_quantizer", "input_quantizer")
    ]
    assert_scales_kept(copy.deepcopy(model))
    assert_scales_kept(model.to(torch.float64))
    assert model.conv1.weight_quantizer.scale.dtype == torch.float64 and model.conv1.input_quantizer.initialized.dtype == torch.bool
    for future in ("swap_module_params_on_conversion", "overwrite_module_params_on_conversion"):
        setattr_future = getattr(torch.__future__, f"set_{future}")
        setattr_future(True)
        try:
            for dtype in (torch.float32, torch.float32, torch.float64):  # a conversion, a no-op one, and back
                assert_scales_kept(model.to(dtype))
        finally:
            setattr_future(False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_scales_kept(loaded)
    loaded.load_state_dict(model.state_dict())
    assert_scales_kept(loaded)


def test_a_few_sgd_steps_lower_the_loss_and_move_every_scale() -> None:
    model, x = quantize_model(net(), 4), images(0, 64)
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(30):
        loss = F.cross_entropy(model(x), y)
        if step == 0:
            initial = [p.detach().clone() for _, p in quant_scales(model)]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for (name, p), p0 in zip(quant_scales(model), initial, strict=True):
        assert abs(p.item() - p0.item()) > 1e-4 * p0.item(), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "bits: expected an integer in 2..8, got 9"),
        ({"bits": 1}, "bits: expected an integer in 2..8, got 1"),
        ({"bits": 4.0}, "bits: expected an integer in 2..8, got 4.0"),
        ({"bits": True}, "bits: expected an integer in 2..8, got True"),
        ({"bits": 4, "act_bits": 9}, "act_bits: expected an integer in 2..8, got 9"),
        ({"bits": 4, "first_last_bits": 16}, "first_last_bits: expected an integer in 2..8, got 16"),
        ({"bits": 4, "first_last_bits": "8"}, "first_last_bits: expected an integer in 2..8, got '8'"),
    ],
)
def test_bad_bits_raise_naming_the_field(kwargs: dict, message: str) -> None:
    model = net()
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        quantize_model(model, **kwargs)
    assert not quant_scales(model) and type(model.conv2) is nn.Conv2d  # refused before any change


def test_bad_models_raise_naming_the_field() -> None:
    with pytest.raises(ValueError, match=re.escape("quantize: the model has no quantizable layer (Conv1d, Conv2d, Linear)")):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 4)
    with pytest.raises(ValueError, match="^quantize: the model is already quantized"):
        quantize_model(quantize_model(net(), 4), 4)
    with pytest.raises(ValueError, match="^quantize: the model is itself a single layer"):
        quantize_model(nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="^first_last_bits: None keeps the first and last layer"):
        quantize_model(nn.Sequential(nn.Linear(3, 3)), 4, first_last_bits=None)


def test_bad_quantizer_arguments_raise_naming_the_field() -> None:
    with pytest.raises(ValueError, match=re.escape("bits: expected an integer in 2..8, got 9")):
        LSQQuantizer(9)
    with pytest.raises(ValueError, match=re.escape("signed: expected True, False or None, got 1")):
        LSQQuantizer(4, signed=1)
    with pytest.raises(ValueError, match=re.escape("act_bits: expected an integer in 2..8, got 0")):
        QuantLinear.from_float(nn.Linear(3, 3), bits=4, act_bits=0)
