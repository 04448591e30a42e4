"""The U-Net and U-Mamba-Enc: shapes, deep supervision, Mamba placement, gradients, learning, and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seg.losses import DeepSupervisionLoss, UncertaintyLoss
from seg.mamba import MambaLayer
from seg.models import SEG_MODELS, UMambaEnc, UNet, build_seg_model
from seg.synthetic import make_slices

SMALL = {"base_channels": 4, "depth": 3}


@pytest.mark.parametrize("name", ["unet", "umamba"])
def test_output_shapes_with_and_without_deep_supervision(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 16)
    assert build_seg_model(name, 1, 4, **SMALL)(x).shape == (2, 4, 32, 16)
    outputs = build_seg_model(name, 1, 4, deep_supervision=True, **SMALL)(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 32, 16), (2, 4, 16, 8)]  # full resolution first
    default = build_seg_model(name, 2, 3, deep_supervision=True)
    assert default.channels == (16, 32, 64, 128)
    assert [tuple(o.shape) for o in default(torch.randn(1, 2, 64, 64))] == [(1, 3, 64, 64), (1, 3, 32, 32),
                                                                             (1, 3, 16, 16)]


def test_umamba_is_the_unet_plus_one_mamba_layer_per_encoder_stage() -> None:
    unet, umamba = UNet(1, 4, **SMALL), UMambaEnc(1, 4, **SMALL)
    assert all(isinstance(m, nn.Identity) for m in unet.mixers)
    assert [type(m) for m in umamba.mixers] == [MambaLayer] * 3
    assert [(m.dim, m.channel_token) for m in umamba.mixers] == [(4, False), (8, False), (16, False)]
    shared = {k for k in umamba.state_dict() if not k.startswith("mixers.")}
    assert shared == set(unet.state_dict())


def test_umamba_channel_tokens_where_positions_are_fewer_than_channels() -> None:
    """UMambaEnc's rule at 64x64 and 16..128 channels: stage 3 has 8x8 = 64 <= 128 positions, so it mixes its 128
    channels as tokens of 64 features; the others mix positions."""
    model = UMambaEnc(1, 4, image_size=(64, 64))
    assert [(m.dim, m.channel_token) for m in model.mixers] == [(16, False), (32, False), (64, False), (64, True)]
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)
    with pytest.raises(ValueError, match=r"^x: this MambaLayer expects H\*W \(channel tokens\) = 64"):
        model(torch.randn(1, 1, 32, 32))  # that stage is tied to the 64x64 patch size
    with pytest.raises(ValueError, match=r"^image_size: expected \(H, W\), multiples of 8"):
        UMambaEnc(1, 4, image_size=(60, 64))


@pytest.mark.parametrize("name", ["unet", "umamba"])
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = build_seg_model(name, 1, 4, deep_supervision=True, **SMALL)
    images, labels = make_slices(2, size=16, seed=0)
    loss = DeepSupervisionLoss(UncertaintyLoss(), num_outputs=2)
    loss(model(torch.from_numpy(images)), torch.from_numpy(labels)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["heads.0.weight", "heads.0.bias"]  # the coarsest output has weight 0, as in nnU-Net
    assert all(s.grad is not None and s.grad != 0 for s in loss.parameters())


def test_the_unet_learns_the_synthetic_slices() -> None:
    torch.manual_seed(0)
    images, labels = (torch.from_numpy(a) for a in make_slices(8, size=32, seed=0))
    model = build_seg_model("unet", 1, 4, **SMALL)
    loss = UncertaintyLoss(weighted=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        value = loss(model(images), labels)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.6 * losses[0]


def test_registry_and_errors_name_the_field() -> None:
    assert SEG_MODELS.names() == ["umamba", "unet"]
    with pytest.raises(ValueError, match=r"^model: unknown seg model 'unett'; did you mean 'unet'\? "
                                         r"Allowed: umamba, unet"):
        build_seg_model("unett", 1, 4)
    with pytest.raises(ValueError, match=r"^model_options.width: unknown option of seg model 'unet'. "
                                         r"Allowed: base_channels, depth, deep_supervision"):
        build_seg_model("unet", 1, 4, width=3)
    with pytest.raises(ValueError, match=r"^num_classes: expected an integer >= 2, got 1"):
        build_seg_model("unet", 1, 1)
    with pytest.raises(ValueError, match=r"^depth: expected an integer >= 2"):
        build_seg_model("umamba", 1, 4, depth=1)
    with pytest.raises(ValueError, match=r"^x: expected \(batch, channels, H, W\) with H and W multiples of 4 "
                                         r"\(depth 3\), got shape \(1, 1, 30, 32\)"):
        build_seg_model("unet", 1, 4, **SMALL)(torch.zeros(1, 1, 30, 32))
