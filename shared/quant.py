"""LSQ fake quantization (Esser et al., ICLR 2020, "Learned Step Size Quantization") for
quantization-aware training: each quantizer learns its step size s by gradient descent.

    v_hat = round(clamp(v / s, -q_n, q_p)) * s
    d v_hat / d v = 1 inside the range, 0 outside             (straight-through estimator)
    d v_hat / d s = -v/s + round(v/s) inside, -q_n below, q_p above, times g = 1 / sqrt(n * q_p)
    s_0 = 2 * mean(|v|) / sqrt(q_p), from the first tensor the quantizer sees

n is the number of weights of a layer (weight quantizer) or of input features per example
(activation quantizer). Signed b-bit ranges are [-2^(b-1), 2^(b-1) - 1], unsigned ones [0, 2^b - 1].
Scales are per tensor (one per layer for weights, one for its input), as in the paper.

Our choices: an input quantizer is signed or unsigned by the data (unsigned, the whole 2^b levels, when
the first tensor it sees has no negative value, as after a ReLU), where the paper decides by the network's
structure; the first and the last layer get `first_last_bits` (8 by default: the paper keeps them at 8 bits)
or stay in full precision; an all-zero first tensor starts s at the dtype's eps rather than 0. Rounding is
torch's (half to even). At v/s exactly -q_n or q_p (a set of measure zero) torch.clamp's gradient counts v
as inside.

Written by hand because the LSQ authors' code is not a library, and torch.ao.quantization's fake-quant
modules use fixed or observer-driven (min/max, moving average) scales. Its private learnable one
(`_LearnableFakeQuantize`, `torch._fake_quantize_learnable_per_tensor_affine`, torch 2.13) is LSQ+-style:
it also learns a zero point, takes its scale from an observer until learning is switched on, scales the
gradient by 1 / sqrt(numel * q_p) over the whole batch rather than per example, and runs only in float32
and bfloat16 with a 1-element scale. At zero point 0 it also rounds before it clamps, so in the half step beyond
each end of the range (-q_n - 1/2 < v/s < -q_n, q_p < v/s < q_p + 1/2) it passes v's gradient and gives s the
inside gradient, where LSQ gives 0 and -q_n or q_p; elsewhere it agrees with ours (a test checks both).

    model = quantize_model(model, bits=4)            # in place; 8-bit first and last layers
    scales = [p for _, p in quant_scales(model)]     # also `isinstance(p, QuantScale)`
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuantScale(nn.Parameter):
    """An LSQ step size: a marker type so that optimizers find the quantizer scales (`isinstance`).
    deepcopy and load_state_dict keep the type as torch does for any Parameter subclass; pickling (torch rebuilds
    a plain Parameter) is handled here, and `Module.to` & co. in `LSQQuantizer._apply`."""

    def __reduce_ex__(self, proto: Any) -> tuple[Callable[..., Tensor], tuple[Any, ...]]:
        rebuild, args = super().__reduce_ex__(proto)  # torch rebuilds a plain Parameter
        return _rebuild_quant_scale, (rebuild, args)


def _rebuild_quant_scale(rebuild: Callable[..., Tensor], args: tuple[Any, ...]) -> Tensor:
    param = rebuild(*args)
    param.__class__ = QuantScale
    return param


def _grad_scale(x: Tensor, scale: float) -> Tensor:
    """x in the forward pass, gradient times `scale`. LSQ's code writes (x - x*g).detach() + x*g, which is
    1 ulp off x in about 3% of cases; this form is exactly x and has the same gradient."""
    x_const = x.detach()
    return x_const + (x - x_const) * scale


def _round_pass(x: Tensor) -> Tensor:
    """round(x) in the forward pass, gradient 1 (LSQ's round_pass; exact, as round(x) - x is exact)."""
    return (x.round() - x).detach() + x


def lsq_quantize(v: Tensor, scale: Tensor, q_n: int, q_p: int, grad_scale: float) -> Tensor:
    """round(clamp(v / s, -q_n, q_p)) * s with the straight-through estimator for v and LSQ's step-size
    gradient times `grad_scale`; computed in v's dtype (the gradient reaches `scale` in its own dtype)."""
    s = _grad_scale(scale.to(v.dtype), grad_scale)
    return _round_pass((v / s).clamp(-q_n, q_p)) * s


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"{name}: expected an integer in 2..8, got {value!r}")


class LSQQuantizer(nn.Module):
    """One LSQ quantizer: a learned per-tensor step size, initialised from the first tensor it sees.
    `signed=None` decides the signedness from that tensor. `per_example` (activations, batch first) takes
    n in g = 1 / sqrt(n * q_p) per example; weight quantizers take the whole tensor (`per_example=False`).
    The buffers `initialized` and `is_signed` make a state_dict round trip (a resumed run) restore it."""

    def __init__(
        self,
        bits: int,
        signed: bool | None = None,
        per_example: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_bits("bits", bits)
        if signed is not None and not isinstance(signed, bool):
            raise ValueError(f"signed: expected True, False or None, got {signed!r}")
        self.bits, self.signed, self.per_example = bits, signed, per_example
        self.scale = QuantScale(torch.tensor(1.0, device=device, dtype=dtype))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self.register_buffer("is_signed", torch.tensor(bool(signed), device=device))
        # Python copies of the buffers, so that a forward pass never waits for the device to read them
        self._initialized, self._signed = False, bool(signed)
        self.register_load_state_dict_post_hook(_sync_flags)

    @property
    def q_range(self) -> tuple[int, int]:
        """(q_n, q_p): the quantized values are the integers -q_n..q_p times the scale."""
        if self._signed:
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def forward(self, v: Tensor) -> Tensor:
        if not self._initialized:
            self._initialize(v)
        q_n, q_p = self.q_range
        n = v.numel() // v.shape[0] if self.per_example else v.numel()
        return lsq_quantize(v, self.scale, q_n, q_p, 1.0 / math.sqrt(n * q_p))

    @torch.no_grad()
    def _initialize(self, v: Tensor) -> None:
        if self.signed is None:
            self.is_signed.fill_(bool((v < 0).any()))
        self._signed = bool(self.is_signed)
        mean_abs = v.detach().abs().mean(dtype=torch.promote_types(v.dtype, torch.float32))
        # an all-zero first tensor (a dead ReLU) would give s = 0 and NaNs: start at the dtype's eps instead
        self.scale.copy_((2 * mean_abs / math.sqrt(self.q_range[1])).clamp_min(torch.finfo(self.scale.dtype).eps))
        self.initialized.fill_(True)
        self._initialized = True

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LSQQuantizer:
        """Module.to & co. on a plain Parameter, then the type back: torch's overwrite and swap conversions
        (torch.__future__) rebuild a plain Parameter from a subclass, or fail when the conversion is a no-op."""
        old = self.scale
        old.__class__ = nn.Parameter
        try:
            return super()._apply(fn, recurse)
        finally:
            old.__class__ = self.scale.__class__ = QuantScale

    def extra_repr(self) -> str:
        signed = "from data" if self.signed is None else self.signed
        return f"bits={self.bits}, signed={signed}, per_example={self.per_example}"


def _sync_flags(module: nn.Module, incompatible_keys: Any) -> None:
    """After load_state_dict: the Python copies follow the loaded buffers."""
    module._initialized, module._signed = bool(module.initialized), bool(module.is_signed)


def _add_quantizers(layer: nn.Module, bits: int, act_bits: int) -> None:
    """The scales take the weight's device and dtype, as the layer's other parameters do."""
    _check_bits("bits", bits)
    _check_bits("act_bits", act_bits)
    where = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    layer.weight_quantizer = LSQQuantizer(bits, signed=True, per_example=False, **where)
    layer.input_quantizer = LSQQuantizer(act_bits, signed=None, per_example=True, **where)


def _copy_parameters(new: nn.Module, layer: nn.Module) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            getattr(new, name).copy_(param).requires_grad_(param.requires_grad)
    new.train(layer.training)


class _QuantConv:
    """What the quantized convolutions share: the quantizers, the copy from a float layer, and the
    convolution on the LSQ-quantized weight (signed, per layer) and input (signedness from the data)."""

    weight: Tensor
    bias: Tensor | None
    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer
    _conv_forward: Callable[..., Tensor]

    def __init__(self, *args: Any, bits: int, act_bits: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        _add_quantizers(self, bits, act_bits)  # type: ignore[arg-type]

    @classmethod
    def from_float(cls, layer: nn.Conv1d | nn.Conv2d, bits: int, act_bits: int) -> Any:
        new = cls(**_conv_kwargs(layer), bits=bits, act_bits=act_bits)
        _copy_parameters(new, layer)  # type: ignore[arg-type]
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """Conv1d on the LSQ-quantized weight and input."""


class QuantConv2d(_QuantConv, nn.Conv2d):
    """Conv2d on the LSQ-quantized weight and input."""


class QuantLinear(nn.Linear):
    """Linear on the LSQ-quantized weight (signed, per layer) and input (signedness from the data)."""

    def __init__(self, *args: Any, bits: int, act_bits: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_quantizers(self, bits, act_bits)

    @classmethod
    def from_float(cls, layer: nn.Linear, bits: int, act_bits: int) -> QuantLinear:
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            bits=bits,
            act_bits=act_bits,
        )
        _copy_parameters(new, layer)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


def _conv_kwargs(layer: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "bias": layer.bias is not None,
        "padding_mode": layer.padding_mode,
        "device": layer.weight.device,
        "dtype": layer.weight.dtype,
    }


_QUANT_LAYERS: dict[type[nn.Module], type[QuantConv1d | QuantConv2d | QuantLinear]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def quantize_model(model: nn.Module, bits: int, act_bits: int | None = None, first_last_bits: int | None = 8) -> nn.Module:
    """Replace, in place, every nn.Conv1d / nn.Conv2d / nn.Linear of `model` by its LSQ version: weights at
    `bits`, inputs at `act_bits` (default `bits`); the first and the last of them (in `named_modules` order)
    at `first_last_bits` for both, or kept in full precision when it is None. Only these exact classes are
    replaced: a subclass may not call its own forward (MultiheadAttention's out_proj), so it stays float."""
    act_bits = bits if act_bits is None else act_bits
    _check_bits("bits", bits)
    _check_bits("act_bits", act_bits)
    if first_last_bits is not None:
        _check_bits("first_last_bits", first_last_bits)
    if any(isinstance(m, LSQQuantizer) for m in model.modules()):
        raise ValueError("quantize: the model is already quantized (it has LSQ quantizers); quantize a float model")
    layers = [m for m in model.modules() if type(m) in _QUANT_LAYERS]
    if not layers:
        raise ValueError("quantize: the model has no quantizable layer (Conv1d, Conv2d, Linear)")
    if type(model) in _QUANT_LAYERS:
        raise ValueError("quantize: the model is itself a single layer, which cannot be replaced in place; "
                         "wrap it in a container (nn.Sequential)")
    if first_last_bits is None and len(layers) == 1:
        raise ValueError("first_last_bits: None keeps the first and last layer in full precision, and the model's "
                         "only quantizable layer is both; expected an integer in 2..8 for this model")
    new: dict[int, nn.Module] = {}
    for i, layer in enumerate(layers):
        edge = i in (0, len(layers) - 1)
        if edge and first_last_bits is None:
            continue
        w_bits, a_bits = (first_last_bits, first_last_bits) if edge else (bits, act_bits)
        new[id(layer)] = _QUANT_LAYERS[type(layer)].from_float(layer, w_bits, a_bits)
    for parent in list(model.modules()):  # every parent, so that a layer used at two places is replaced at both
        for name, child in parent.named_children():
            if id(child) in new:
                setattr(parent, name, new[id(child)])
    return model


def quant_scales(model: nn.Module) -> list[tuple[str, QuantScale]]:
    """The named LSQ step sizes of `model`, in module order."""
    return [(name, p) for name, p in model.named_parameters() if isinstance(p, QuantScale)]
