"""fedsam.models: shapes, parameter counts against closed-form formulas, GroupNorm only, seeded init, errors."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from fedsam.models import MODELS, NORM_GROUPS, build_model
from shared.models import DigitsCNN
from shared.registry import UnknownNameError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def gn(c: int) -> int:
    return 2 * c  # affine weight and bias


def resnet18_count(num_classes: int, in_channels: int = 3) -> int:
    """CIFAR ResNet-18: 3x3 stem, BasicBlocks [2, 2, 2, 2] of widths 64..512, 1x1 projection shortcuts."""
    total = conv(in_channels, 64, 3, False) + gn(64)
    c_in = 64
    for planes in (64, 128, 256, 512):
        for _ in range(2):  # two BasicBlocks per stage
            total += conv(c_in, planes, 3, False) + gn(planes) + conv(planes, planes, 3, False) + gn(planes)
            if c_in != planes:  # only the first block of a stage changes the shape
                total += conv(c_in, planes, 1, False) + gn(planes)
            c_in = planes
    return total + 512 * num_classes + num_classes


def vgg11_count(num_classes: int) -> int:
    """VGG-11 "A": convs 3-64-128-256-256-512-512-512-512 with biases, GN after each, 512 -> classes head."""
    widths = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    body = sum(conv(a, b, 3, True) + gn(b) for a, b in pairwise(widths))
    return body + 512 * num_classes + num_classes


def cnn_count(num_classes: int, c: int, h: int, w: int, width: int = 32) -> int:
    return (
        conv(c, width, 3, False) + gn(width) + conv(width, 2 * width, 3, False) + gn(2 * width)
        + 2 * width * (h // 2) * (w // 2) * num_classes + num_classes
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "num_classes", "shape", "expected"),
    [
        ("cnn", 10, (1, 8, 8), cnn_count(10, 1, 8, 8)),
        ("cnn", 100, (3, 32, 32), cnn_count(100, 3, 32, 32)),
        ("resnet18", 10, (3, 32, 32), resnet18_count(10)),
        ("resnet18", 10, (1, 8, 8), resnet18_count(10, in_channels=1)),
        ("vgg11", 10, (3, 32, 32), vgg11_count(10)),
        ("vgg11", 100, (3, 32, 32), vgg11_count(100)),
    ],
)
def test_output_shape_and_parameter_count(name: str, num_classes: int, shape: tuple[int, ...], expected: int) -> None:
    model = build_model(name, num_classes, shape)
    assert model(torch.randn(2, *shape)).shape == (2, num_classes)
    assert n_params(model) == expected


def test_known_sizes() -> None:
    assert resnet18_count(10) == 11_173_962  # the well-known CIFAR ResNet-18 size (BN and GN have equal counts)
    assert n_params(build_model("resnet18", 10, (3, 32, 32))) == 11_173_962
    assert n_params(build_model("cnn", 10, (1, 8, 8))) == n_params(DigitsCNN(norm="group"))  # the shared model


@pytest.mark.parametrize("name", ["cnn", "resnet18", "vgg11"])
def test_group_norm_only(name: str) -> None:
    model = build_model(name, 10, (3, 32, 32))
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]
    assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert not any(buffer.numel() for buffer in model.buffers())  # no running statistics to average or skew
    if name != "cnn":
        assert {m.num_groups for m in norms} == {NORM_GROUPS}


@pytest.mark.parametrize("name", ["cnn", "resnet18", "vgg11"])
def test_init_is_deterministic_under_manual_seed(name: str) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, 10, (3, 32, 32)).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_vgg11_init_follows_the_reference() -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", 10, (3, 32, 32))
    first = model.features[0]
    assert torch.count_nonzero(first.bias) == 0 and torch.count_nonzero(model.head.bias) == 0
    # Kaiming normal, fan-out mode: std = sqrt(2 / (out_channels * 3 * 3))
    assert abs(first.weight.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.1
    assert abs(model.head.weight.std().item() / 0.01 - 1) < 0.05


def test_registry_and_errors() -> None:
    assert {"cnn", "resnet18", "vgg11"} <= set(MODELS.names())  # the suite's one registry (testbeds.models)
    with pytest.raises(
        UnknownNameError,
        match=r"model: unknown model 'resnet'; did you mean 'resnet18'\? Allowed: cnn, .*resnet18, .*vgg11",
    ):
        build_model("resnet", 10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"input_shape: vgg11 .* >= 32"):
        build_model("vgg11", 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape: expected \(channels, height, width\)"):
        build_model("cnn", 10, (8, 8))
    with pytest.raises(ValueError, match=r"num_classes: expected an integer >= 2"):
        build_model("cnn", 1, (1, 8, 8))


def test_resnet18_with_batch_norm_for_the_centralized_papers() -> None:
    """`norm="batch"`: the kuangliu/pytorch-cifar ResNet-18 of the SAM, SAF and USEFUL papers, same size."""
    model = build_model("resnet18", 10, (3, 32, 32), norm="batch")
    norms = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))}
    assert norms == {"BatchNorm2d"} and n_params(model) == 11_173_962
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="^norm: expected one of group, batch"):
        build_model("resnet18", 10, (3, 32, 32), norm="layer")
