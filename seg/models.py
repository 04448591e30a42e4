"""Segmentation networks: a 2D U-Net baseline (nnU-Net's plain U-Net) and U-Mamba-Enc (the same U-Net with a
`MambaLayer` after every encoder stage, as UU-Mamba's `UMambaEnc`).

The U-Net follows nnU-Net's `PlainConvUNet`: stages of two conv3x3-InstanceNorm-LeakyReLU blocks, the first
block of each stage after the first downsampling with stride 2, channels doubling per stage, transposed
convolutions (kernel 2, stride 2) up, skip connections by concatenation, a 1x1 head per decoder stage, and
nnU-Net's He initialisation (`InitWeights_He(1e-2)`). UU-Mamba's `UMambaEnc` (tiffany9056/UU-Mamba,
`nnunetv2/nets/UMambaEnc_3d.py`) builds the same skeleton from residual blocks and upsamples by nearest
interpolation plus a 1x1 conv; here both networks share the plain skeleton, so that the Mamba layers are the
only difference between the baseline and the variant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from seg.mamba import MambaLayer
from shared.registry import Registry, check_keyword_options
from shared.validate import check_int

__all__ = ["SEG_MODELS", "UMambaEnc", "UNet", "build_seg_model"]

SegModelBuilder = Callable[..., nn.Module]
SEG_MODELS: Registry[SegModelBuilder] = Registry("seg model")


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """nnU-Net's ConvDropoutNormReLU without dropout: conv3x3 (bias, as nnU-Net's plans) - InstanceNorm - LeakyReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                         nn.InstanceNorm2d(out_channels, eps=1e-5, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv_block(in_channels, out_channels, stride), _conv_block(out_channels, out_channels, 1))


def _he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): Kaiming-normal convolutions with the LeakyReLU slope, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@SEG_MODELS.register("unet")
class UNet(nn.Module):
    """A 2D U-Net with `depth` resolution stages of base_channels * 2^s channels. Returns the logits at full
    resolution (batch, num_classes, H, W), or with `deep_supervision` the list of the decoder stages' logits,
    full resolution first then each half size (nnU-Net's order), depth - 1 maps in all; the heads of every
    decoder stage exist either way, as in nnU-Net, so that one checkpoint serves both. H and W must be
    multiples of 2^(depth - 1)."""

    def __init__(self, in_channels: int, num_classes: int, *, base_channels: int = 16, depth: int = 4,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 2)
        check_int("base_channels", base_channels, 1)
        check_int("depth", depth, 2)
        self.depth, self.deep_supervision = depth, deep_supervision
        self.channels = tuple(base_channels * 2**s for s in range(depth))
        inputs = (in_channels, *self.channels[:-1])
        self.encoder = nn.ModuleList(_stage(i, c, 1 if s == 0 else 2)
                                     for s, (i, c) in enumerate(zip(inputs, self.channels)))
        # one token mixer after each encoder stage: none here, MambaLayers in UMambaEnc
        self.mixers = nn.ModuleList(nn.Identity() for _ in self.channels)
        self.up = nn.ModuleList(nn.ConvTranspose2d(self.channels[s + 1], self.channels[s], 2, stride=2)
                                for s in reversed(range(depth - 1)))
        self.decoder = nn.ModuleList(_stage(2 * self.channels[s], self.channels[s], 1)
                                     for s in reversed(range(depth - 1)))
        self.heads = nn.ModuleList(nn.Conv2d(self.channels[s], num_classes, 1) for s in reversed(range(depth - 1)))
        self.apply(_he_init)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        factor = 2 ** (self.depth - 1)
        if x.dim() != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"x: expected (batch, channels, H, W) with H and W multiples of {factor} "
                             f"(depth {self.depth}), got shape {tuple(x.shape)}")
        skips = []
        for stage, mixer in zip(self.encoder, self.mixers):
            x = mixer(stage(x))
            skips.append(x)
        outputs = []
        for level, (up, stage, head) in enumerate(zip(self.up, self.decoder, self.heads)):
            x = stage(torch.cat((up(x), skips[-2 - level]), dim=1))
            if self.deep_supervision or level == self.depth - 2:
                outputs.append(head(x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


@SEG_MODELS.register("umamba")
class UMambaEnc(UNet):
    """`UNet` with a `MambaLayer` (d_state 16, d_conv 4, expand 2) after every encoder stage, as UMambaEnc.
    With `image_size` (the training patch size, as UMambaEnc's `input_size`), a stage whose H*W is at most its
    channel count mixes channels as tokens instead of positions, as the reference does; that fixes the input
    size for those stages. Without it every stage mixes positions and any valid input size works.
    `mamba_residual` adds each stage's input back to its Mamba output (the reference has no such skip)."""

    def __init__(self, in_channels: int, num_classes: int, *, base_channels: int = 16, depth: int = 4,
                 deep_supervision: bool = False, image_size: tuple[int, int] | None = None,
                 mamba_residual: bool = False) -> None:
        super().__init__(in_channels, num_classes, base_channels=base_channels, depth=depth,
                         deep_supervision=deep_supervision)
        factor = 2 ** (depth - 1)
        if image_size is not None and not (
                isinstance(image_size, (tuple, list)) and len(image_size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= factor and s % factor == 0
                        for s in image_size)):
            raise ValueError(f"image_size: expected (H, W), multiples of {factor} (depth {depth}), got {image_size!r}")
        mixers = []
        for s, channels in enumerate(self.channels):
            positions = image_size[0] * image_size[1] // 4**s if image_size is not None else None
            channel_token = positions is not None and positions <= channels
            mixers.append(MambaLayer(positions if channel_token else channels, channel_token=channel_token,
                                     residual=mamba_residual))
        self.mixers = nn.ModuleList(mixers)


def build_seg_model(name: str, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """The segmentation network `name` ("unet", "umamba") for `in_channels` input channels and `num_classes`
    classes (background included); `options` are its keyword-only settings (base_channels, depth, ...)."""
    builder = SEG_MODELS.get(name, "model")
    check_keyword_options(builder, options, f"seg model '{name}'")
    return builder(in_channels, num_classes, **options)
