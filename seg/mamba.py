"""Mamba (the selective state-space block S6) in plain PyTorch, with a parallel selective scan.

`Mamba` follows state-spaces/mamba `mamba_ssm/modules/mamba_simple.py` (its path without the fused
kernels): in_proj to x and z, a causal depthwise conv1d, SiLU, x_proj to (dt, B, C), dt_proj with
softplus, A = -exp(A_log) with the S4D-real initialisation, the D skip and out_proj. mamba_ssm's
`selective_scan_fn` is a compiled CUDA kernel (UU-Mamba cannot run without one, SEED_METHODS 6e), so
the scan here is our own (`selective_scan`): the sequence is cut into chunks; within a chunk a Blelloch
(work-efficient, log-depth) scan of h_t = a_t h_{t-1} + x_t, between chunks a loop that carries the
state; the backward is written by hand (the same scan run in reverse) and recomputes each chunk's states
instead of storing them. It only multiplies decays a_t = exp(dt*A) <= 1 and adds, so unlike cumulative
sums of log-decays it cannot overflow whatever dt is. `selective_scan_ref` is mamba_ssm's sequential loop
over positions, the reference the tests compare against. Where mamba_ssm is installed and the tensors live
on CUDA, `selective_scan` calls its kernel instead.

`MambaLayer` is UU-Mamba's (and U-Mamba's) `MambaLayer`: LayerNorm then Mamba over the flattened
spatial positions as tokens, or over the channels as tokens (`channel_token`), in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # the CUDA kernel (optional: mamba_ssm imports its compiled extension, absent on CPU machines)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except (ImportError, OSError):
    _cuda_selective_scan = None

__all__ = ["Mamba", "MambaLayer", "selective_scan", "selective_scan_ref"]


def _check_scan_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None) -> None:
    """mamba_ssm's layout: u, delta, z (batch, dim, length); A (dim, d_state); B, C (batch, d_state, length)."""
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError(f"u: the sequence is empty, shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected (dim, d_state) with dim = {dim}, got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("A: complex A is not supported (Mamba's S4D-real A is real)")
    d_state = A.shape[1]
    expected = {"delta": (u.shape, delta), "B": ((batch, d_state, length), B), "C": ((batch, d_state, length), C)}
    if z is not None:
        expected["z"] = (u.shape, z)
    if D is not None:
        expected["D"] = ((dim,), D)
    if delta_bias is not None:
        expected["delta_bias"] = ((dim,), delta_bias)
    for name, (shape, tensor) in expected.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """The step sizes dt = softplus(delta + delta_bias) (as mamba_ssm), in `dtype`."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D*u, gated by SiLU(z), back in u's dtype (as mamba_ssm)."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """mamba_ssm's `selective_scan_ref`: one step per position, h = exp(dt*A) h + dt*B*u, y = C.h (+ D*u, * SiLU(z)).
    Slow (a Python loop over the length, whose autograd graph has a node per step); the reference for
    `selective_scan`. Unlike mamba_ssm's, it keeps float64 in float64 (theirs computes in float32)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = torch.promote_types(u.dtype, torch.float32)
    delta = _delta(delta, delta_bias, delta_softplus, dtype)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.to(dtype)))
    inputs = torch.einsum("bdl,bnl,bdl->bdln", delta, B.to(dtype), u.to(dtype))
    C = C.to(dtype)
    state = decay.new_zeros(decay.shape[0], decay.shape[1], decay.shape[3])
    ys = []
    for i in range(u.shape[2]):
        state = decay[:, :, i] * state + inputs[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, i]))
    return _finish(torch.stack(ys, dim=2), u, D, z)


def _blelloch_(a: Tensor, x: Tensor, reverse: bool = False) -> None:
    """In place, x_t <- a_t x_{t-1} + x_t along dim 1 of contiguous (batch, 2^k, features) buffers (the inclusive
    scan of the linear recurrence); with `reverse`, x_t <- a_t x_{t+1} + x_t. Up-sweep: at stride s, the last
    position of each block of 2s absorbs its first half, and a there becomes the product of the half's decays;
    down-sweep: the last position of each first half gets the complete prefix before its block. O(L) work in
    2 log2(L) vectorised steps. Only products of decays and sums: it cannot overflow. `a` is overwritten."""
    batch, length, features = x.shape
    stride = 1
    while stride < length:
        a_view = a.view(batch, length // (2 * stride), 2 * stride, features)
        x_view = x.view(batch, length // (2 * stride), 2 * stride, features)
        end, half = (0, stride) if reverse else (-1, stride - 1)
        x_view[:, :, end].addcmul_(a_view[:, :, end], x_view[:, :, half])
        a_view[:, :, end].mul_(a_view[:, :, half])
        stride *= 2
    stride = length // 4
    while stride >= 1:
        a_view = a.view(batch, length // (2 * stride), 2 * stride, features)
        x_view = x.view(batch, length // (2 * stride), 2 * stride, features)
        if reverse:
            x_view[:, :-1, stride].addcmul_(a_view[:, :-1, stride], x_view[:, 1:, 0])
        else:
            x_view[:, 1:, stride - 1].addcmul_(a_view[:, 1:, stride - 1], x_view[:, :-1, -1])
        stride //= 2


def _scan_(a: Tensor, x: Tensor, reverse: bool = False) -> Tensor:
    """`_blelloch_` for any length: padded to a power of two after the end (before the start when `reverse`),
    where the padding cannot reach the real positions. Returns the states (x itself when no padding was needed)."""
    length = x.shape[1]
    padded = 1 << (length - 1).bit_length()
    if padded == length:
        _blelloch_(a, x, reverse)
        return x
    pad = (0, 0, padded - length, 0) if reverse else (0, 0, 0, padded - length)
    a, x = F.pad(a, pad), F.pad(x, pad)
    _blelloch_(a, x, reverse)
    return x[:, padded - length:] if reverse else x[:, :length]


_CHUNK_ELEMENTS = 1 << 18  # (batch, chunk, dim, d_state) work tensors of 1 MiB in float32: they stay in cache


def _chunk_length(batch: int, dim: int, d_state: int, length: int) -> int:
    """Positions per chunk: a power of two in [16, 1024] near _CHUNK_ELEMENTS / (batch*dim*d_state), at most
    the length rounded up to a power of two. The result does not depend on it beyond rounding."""
    chunk = max(16, min(1024, _CHUNK_ELEMENTS // (batch * dim * d_state)))
    return min(1 << (chunk.bit_length() - 1), 1 << (length - 1).bit_length())


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, over chunks of the length: within a chunk a
    Blelloch scan (the state carried in from the previous chunk folded into its first input), between chunks a
    loop that passes the last state on. The (batch, length, dim, d_state) states are never stored: the forward
    keeps the state entering each chunk, and the backward recomputes a chunk's states from it, then runs the
    adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse scan, chunks last to first. Memory is
    O(batch*length*dim) instead of O(batch*length*dim*d_state), and each chunk's work stays in cache.
    Layouts: dt, u (batch, length, dim); A (dim, d_state); B, C (batch, length, d_state)."""

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        batch, length, dim = u.shape
        d_state = A.shape[1]
        chunk = _chunk_length(batch, dim, d_state, length)
        dt_u = dt * u
        state = u.new_zeros(batch, dim, d_state)
        entering, y = [], torch.empty_like(u)
        for start in range(0, length, chunk):
            span = slice(start, min(start + chunk, length))
            entering.append(state)
            h = _SelectiveScan._states(dt[:, span], dt_u[:, span], A, B[:, span], state)[1]
            y[:, span] = (h * C[:, span, None, :]).sum(-1)
            state = h[:, -1].clone()
        ctx.save_for_backward(dt, u, A, B, C, torch.stack(entering))
        ctx.chunk = chunk
        return y

    @staticmethod
    def _states(dt: Tensor, dt_u: Tensor, A: Tensor, B: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(decays a, states h) of one chunk, each (batch, chunk, dim, d_state), from the state entering it."""
        (batch, span, dim), d_state = dt.shape, A.shape[1]
        # explicit contiguous outputs: a broadcast product of strided chunks may come out in a permuted layout
        decay = torch.mul(dt[..., None], A, out=dt.new_empty(batch, span, dim, d_state)).exp_()
        h = torch.mul(dt_u[..., None], B[:, :, None, :], out=dt.new_empty(batch, span, dim, d_state))
        h[:, 0].addcmul_(decay[:, 0], state)
        work = decay.clone().view(batch, span, dim * d_state)
        return decay, _scan_(work, h.view(batch, span, dim * d_state)).view(batch, span, dim, d_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, ...]:
        dt, u, A, B, C, entering = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # it arrives transposed; chunks of it must be contiguous like the rest
        batch, length, dim = u.shape
        d_state = A.shape[1]
        dt_u = dt * u
        grad_dt, grad_u, grad_B, grad_C = (torch.empty_like(t) for t in (dt, u, B, C))
        grad_A = torch.zeros_like(A)
        carry = u.new_zeros(batch, dim, d_state)  # a_{t+1} g_{t+1} from the chunk after this one
        starts = range(0, length, ctx.chunk)
        for index in reversed(range(len(starts))):
            span = slice(starts[index], min(starts[index] + ctx.chunk, length))
            decay, h = _SelectiveScan._states(dt[:, span], dt_u[:, span], A, B[:, span], entering[index])
            gy = grad_y[:, span]
            g = torch.mul(gy[..., None], C[:, span, None, :], out=torch.empty_like(decay))
            g[:, -1] += carry
            next_decay = F.pad(decay[:, 1:], (0, 0, 0, 0, 0, 1))  # a_{t+1}; the last one multiplies nothing
            steps = g.shape[1]
            g = _scan_(next_decay.view(batch, steps, -1), g.view(batch, steps, -1), reverse=True)
            g = g.view(batch, steps, dim, d_state)
            grad_C[:, span] = (gy[:, :, None, :] @ h).squeeze(-2)
            grad_B[:, span] = (dt_u[:, span, None, :] @ g).squeeze(-2)
            grad_dt_u = (g * B[:, span, None, :]).sum(-1)
            grad_log_decay = g * decay  # times h_{t-1}, the state before each position
            carry = grad_log_decay[:, 0].clone()
            grad_log_decay[:, 1:] *= h[:, :-1]
            grad_log_decay[:, 0] *= entering[index]
            grad_dt[:, span] = (grad_log_decay * A).sum(-1) + grad_dt_u * u[:, span]
            grad_A += (grad_log_decay * dt[:, span, :, None]).sum((0, 1))
            grad_u[:, span] = grad_dt_u * dt[:, span]
        return grad_dt, grad_u, grad_A, grad_B, grad_C


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """The selective scan of `selective_scan_ref` (same arguments, same result), by the chunked parallel scan;
    mamba_ssm's CUDA kernel when it is installed and the tensors are on CUDA (it has no float64)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if _cuda_selective_scan is not None and u.is_cuda and u.dtype != torch.float64:
        return _cuda_selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    dtype = torch.promote_types(u.dtype, torch.float32)
    dt = _delta(delta, delta_bias, delta_softplus, dtype)
    tokens_last = [t.to(dtype).transpose(1, 2).contiguous() for t in (dt, u, B, C)]  # (batch, length, -1)
    y = _SelectiveScan.apply(tokens_last[0], tokens_last[1], A.to(dtype), tokens_last[2], tokens_last[3])
    return _finish(y.transpose(1, 2), u, D, z)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


class Mamba(nn.Module):
    """mamba_simple's `Mamba(d_model, d_state=16, d_conv=4, expand=2)` on (batch, length, d_model) tokens, with
    its initialisation: dt_proj's bias set so that softplus(bias) is log-uniform in [dt_min, dt_max], and
    A = -[1..d_state] per channel (S4D real). Training-only: no inference cache or step()."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            _check_positive_int(name, value)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min!r}, {dt_max!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(batch, length, d_model) -> (batch, length, d_model)."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden: expected (batch, length, {self.d_model}), got shape {tuple(hidden.shape)}")
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, length) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: the right padding is cut off
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # its bias goes in as delta_bias, as in mamba_ssm
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


class MambaLayer(nn.Module):
    """UU-Mamba's `MambaLayer` on a (batch, channels, *spatial) map: LayerNorm then Mamba over the H*W positions
    as tokens of `dim` = channels features, or, with `channel_token`, over the channels as tokens of
    `dim` = H*W features (UMambaEnc uses that where H*W <= channels). Runs in float32 with autocast off,
    as the reference. The reference returns Mamba's output alone (no skip); `residual` adds the input back."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, channel_token: bool = False,
                 residual: bool = False) -> None:
        super().__init__()
        _check_positive_int("dim", dim)
        self.dim, self.channel_token, self.residual = dim, channel_token, residual
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(f"x: expected (batch, channels, *spatial), got shape {tuple(x.shape)}")
        features = x.shape[2:].numel() if self.channel_token else x.shape[1]
        if features != self.dim:
            what = "H*W (channel tokens)" if self.channel_token else "channels"
            raise ValueError(f"x: this MambaLayer expects {what} = {self.dim}, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            tokens = x.flatten(2) if self.channel_token else x.flatten(2).transpose(1, 2)
            out = self.mamba(self.norm(tokens))
            if self.residual:
                out = out + tokens
            if not self.channel_token:
                out = out.transpose(1, 2)
            return out.reshape(x.shape)
