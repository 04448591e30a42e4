"""The parallel selective scan against mamba_ssm's sequential reference (float64), its speed, and the Mamba block."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from seg.mamba import Mamba, MambaLayer, selective_scan, selective_scan_ref


def _scan_inputs(batch: int, dim: int, length: int, d_state: int, seed: int = 0, dt_scale: float = 1.0,
                 dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {"u": randn(batch, dim, length), "delta": dt_scale * randn(batch, dim, length),
            "A": -5 * torch.rand(dim, d_state, generator=g, dtype=dtype), "B": randn(batch, d_state, length),
            "C": randn(batch, d_state, length), "D": randn(dim), "z": randn(batch, dim, length),
            "delta_bias": randn(dim)}


def _value_and_grads(scan, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, **kwargs)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()  # a generic upstream gradient
    return y.detach(), {k: v.grad for k, v in leaves.items()}


# (batch, dim, length, d_state): lengths below, at and above powers of two; the last two run over several
# chunks (chunk length 64 and 16 for their batch*dim*d_state), with a partial last chunk
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 4), (1, 4, 64, 16), (3, 2, 100, 3), (4, 64, 200, 16), (2, 256, 37, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_parallel_scan_matches_the_sequential_reference_in_float64(shape: tuple[int, int, int, int]) -> None:
    y = _assert_matches_reference(_scan_inputs(*shape), tol=1e-10)
    assert y.dtype == torch.float64


def _assert_matches_reference(inputs: dict[str, torch.Tensor], tol: float) -> torch.Tensor:
    """The parallel scan's output and gradients equal the reference's (gradients to `tol` of their scale)."""
    y, grads = _value_and_grads(selective_scan, inputs, delta_softplus=True)
    y_ref, grads_ref = _value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name in inputs:
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=tol, atol=tol * max(scale, 1.0), msg=name)
    return y


def test_parallel_scan_without_optional_inputs_is_plain_c_dot_h() -> None:
    """No D, z, bias or softplus: y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, written out."""
    inputs = _scan_inputs(2, 3, 7, 2)
    u, dt, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    dt = dt.abs()
    expected = torch.zeros_like(u)
    for b in range(2):
        for d in range(3):
            h = torch.zeros(2, dtype=torch.float64)
            for t in range(7):
                h = torch.exp(dt[b, d, t] * A[d]) * h + dt[b, d, t] * B[b, :, t] * u[b, d, t]
                expected[b, d, t] = (C[b, :, t] * h).sum()
    torch.testing.assert_close(selective_scan(u, dt, A, B, C), expected, rtol=1e-12, atol=1e-12)


def test_parallel_scan_is_stable_for_large_steps() -> None:
    """dt*A down to -1e3 (cumulative log-decays of -1e5): products of decays underflow to 0, nothing overflows."""
    _assert_matches_reference(_scan_inputs(2, 8, 300, 16, dt_scale=200.0, dtype=torch.float32), tol=1e-4)


def test_parallel_scan_gradcheck() -> None:
    inputs = _scan_inputs(2, 3, 19, 2)
    leaves = tuple(v.clone().requires_grad_() for v in inputs.values())
    assert torch.autograd.gradcheck(lambda *args: selective_scan(*args, delta_softplus=True), leaves)


def test_parallel_scan_is_much_faster_than_the_reference() -> None:
    """Forward + backward at U-Mamba's 32x32 stage (1024 tokens, d_inner 64, d_state 16): the reference's graph has
    a node per position. Measured ~30x on one core; asserted >= 3x to stay robust on a loaded machine."""
    inputs = _scan_inputs(1, 64, 1024, 16, dtype=torch.float32)

    def seconds(scan) -> float:
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            _value_and_grads(scan, inputs, delta_softplus=True)
            best = min(best, time.perf_counter() - start)
        return best

    ratio = seconds(selective_scan_ref) / seconds(selective_scan)
    print(f"parallel scan speed-up over selective_scan_ref (forward + backward, L=1024): {ratio:.1f}x")
    assert ratio >= 3


@pytest.mark.parametrize(("name", "shape"), [("delta", (2, 3, 4)), ("A", (4, 2)), ("B", (2, 3, 5)),
                                             ("C", (2, 3, 4)), ("D", (4,)), ("z", (2, 3, 4)),
                                             ("delta_bias", (2,))])
def test_scan_errors_name_the_argument(name: str, shape: tuple[int, ...]) -> None:
    inputs = _scan_inputs(2, 3, 5, 2)
    inputs[name] = torch.zeros(shape, dtype=torch.float64)
    for scan in (selective_scan, selective_scan_ref):
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            scan(**inputs)


def test_mamba_init_matches_mamba_simple() -> None:
    torch.manual_seed(0)
    block = Mamba(32)
    assert (block.d_inner, block.dt_rank, block.conv1d.kernel_size, block.x_proj.out_features) == (64, 2, (4,), 34)
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1, 17.0).repeat(64, 1))  # S4D real
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    torch.testing.assert_close(block.D, torch.ones(64))


def test_mamba_is_causal_and_runs_the_reference_scan_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = Mamba(8, d_state=4).double()
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    y = block(x)
    later = x.clone()
    later[:, 20:] = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(block(later)[:, :20], y[:, :20], rtol=0, atol=0)  # no token sees a later one
    monkeypatch.setattr("seg.mamba.selective_scan", selective_scan_ref)
    torch.testing.assert_close(block(x), y, rtol=1e-10, atol=1e-10)


def test_mamba_layer_tokens_residual_and_float32() -> None:
    torch.manual_seed(0)
    spatial = MambaLayer(6)
    x = torch.randn(2, 6, 4, 5)
    y = spatial(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    tokens = x.flatten(2).transpose(1, 2)  # (batch, H*W, C): positions are the tokens
    expected = spatial.mamba(spatial.norm(tokens)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(y, expected)
    spatial.residual = True
    torch.testing.assert_close(spatial(x), expected + x)

    channels = MambaLayer(20, channel_token=True)  # (batch, C, H*W): channels are the tokens
    torch.testing.assert_close(channels(x), channels.mamba(channels.norm(x.flatten(2))).reshape(x.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert spatial(x.bfloat16()).dtype == torch.float32  # autocast off, float32 inside and out


def test_mamba_layer_rejects_the_wrong_feature_count() -> None:
    with pytest.raises(ValueError, match=r"^x: this MambaLayer expects channels = 6"):
        MambaLayer(6)(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match=r"^x: this MambaLayer expects H\*W \(channel tokens\) = 16"):
        MambaLayer(16, channel_token=True)(torch.zeros(1, 5, 4, 5))
    with pytest.raises(ValueError, match=r"^d_state: expected an integer >= 1"):
        Mamba(8, d_state=0)
