"""CUDA checks for every member (skipped without a CUDA device): the float64 formula on the GPU,
the fp16 autocast + GradScaler recipe, and no parameter-sized allocation after the first step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared import OPTIMIZERS, sam_backward

NAMES = [name for name in OPTIMIZERS.names() if not OPTIMIZERS.get(name).driver_only]  # driver-only members: test_driver_members
pytestmark = pytest.mark.gpu


def first_loss(opt, logits, y):
    return opt.ascent_loss(logits, y) if opt.ascent_loss is not None else F.cross_entropy(logits, y)


def make(
    dtype: torch.dtype = torch.float32, width: int = 64
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, 10)).to("cuda", dtype)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 32, generator=gen).to("cuda", dtype), torch.randint(0, 10, (16,), generator=gen).cuda())
        for _ in range(4)
    ]
    return model, batches


def cpu_twin(model: nn.Module) -> nn.Module:
    twin = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    twin.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    return twin


@pytest.mark.parametrize("name", NAMES)
def test_cuda_float64_matches_cpu(name: str) -> None:
    """The same float64 steps on CUDA (foreach kernels) and on CPU agree to 1e-10."""
    model, batches = make(torch.float64)
    twin = cpu_twin(model)
    runs = []
    for m, device in ((model, "cuda"), (twin, "cpu")):
        opt = OPTIMIZERS.get(name)(m.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            ascent = None if opt.ascent_loss is None else (lambda b, m=m, opt=opt: opt.ascent_loss(m(b[0]), b[1]))
            sam_backward(opt, [(x, y)], lambda b, m=m: F.cross_entropy(m(b[0]), b[1]), ascent=ascent)
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().cpu() for p in m.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_fp16_autocast_grad_scaler(name: str) -> None:
    """fp16 autocast with GradScaler('cuda'): no "unscale_() has already been called", no skipped
    step, and close to fp32."""
    reference, batches = make()
    model, _ = make()
    ref_opt = OPTIMIZERS.get(name)(reference.parameters(), "sgd", lr=0.1, momentum=0.9)
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=1)
    for x, y in batches:
        first_loss(ref_opt, reference(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        F.cross_entropy(reference(x), y).backward()
        ref_opt.second_step(zero_grad=True)
        with torch.autocast("cuda", dtype=torch.float16):
            scaler.scale(first_loss(opt, model(x), y)).backward()
        opt.first_step(True)
        with torch.autocast("cuda", dtype=torch.float16):
            scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.unperturb()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**14
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=5e-3, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_no_parameter_sized_allocation_after_first_step(name: str) -> None:
    """The peak memory over first_step, and over unperturb + base step, stays below the smallest
    parameter (16 KiB; the caching allocator rounds each scalar up to 512 bytes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4096), nn.Tanh(), nn.Linear(4096, 4096)).cuda()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1, momentum=0.9)
    smallest = min(p.numel() * p.element_size() for p in model.parameters())
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def peak_over(fn) -> int:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    for step in range(3):
        first_loss(opt, model(x), y).backward()
        first = peak_over(lambda: opt.first_step(zero_grad=True))
        F.cross_entropy(model(x), y).backward()
        second = peak_over(lambda: (opt.unperturb(), opt.step()))
        opt.zero_grad(set_to_none=False)
        keeps_buffers = name in ("gsam", "sagm", "gaqat") or opt.defaults["adaptive"]  # their copy of g, ASAM's backup
        if step == 0 and keeps_buffers:
            assert first >= smallest, "the first step allocates the member's buffers"
        elif step == 0:  # w + e is built in the gradients: nothing allocated (the base step's momentum is)
            assert first < smallest, f"step 1: first_step peaked at {first} bytes"
        else:
            assert max(first, second) < smallest, f"step {step + 1}: peaks {first}, {second} bytes"


DRIVER_NAMES = [name for name in OPTIMIZERS.names() if OPTIMIZERS.get(name).driver_only]
DRIVER_OPTIONS = {"saf": {"past": 1, "start_epoch": 1}, "mesa": {"beta": 0.7}, "tram-x": {"sigma": 0.3}}


@pytest.mark.parametrize("name", DRIVER_NAMES)
def test_cuda_driver_members_match_cpu_in_float64(name: str) -> None:
    """SAF (host buffer, CUDA logits), MESA (EMA copy on the GPU) and TRAM (d as a CUDA tensor) through
    `member_backward` on CUDA and on CPU agree to 1e-10 in float64 (TRAM-x draws its noise on each
    device's generator, so it is checked for finite weights and a positive radius only)."""
    from shared import Batch, member_backward

    model, batches = make(torch.float64)
    twin = cpu_twin(model)
    runs = []
    for m, device in ((model, "cuda"), (twin, "cpu")):
        opt = OPTIMIZERS.get(name)(m.parameters(), "sgd", lr=0.1, momentum=0.9, **DRIVER_OPTIONS.get(name, {}))
        for _ in range(3):  # epochs: SAF's term starts at the second
            for i, (x, y) in enumerate(batches):
                idx = torch.arange(i * 16, (i + 1) * 16)
                member_backward(opt, m, [Batch(x.to(device), y.to(device), idx)])
                opt.step()
        runs.append([p.detach().cpu() for p in m.parameters()])
        if name == "tram-x":
            assert opt.last_radius.item() > 0 and all(torch.isfinite(p).all() for p in runs[-1])
    if name != "tram-x":
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
