"""The one model registry of the suite: `samsuite train`, fedsam and the testbeds build their models
by name with `build_model(name, num_classes, input_shape)`, so a model is added once and every
experiment can use it.

`input_shape` is the shape of one example without the batch dimension: (C, H, W) for images,
(C, L) for 1-D signals such as MNIST-1D. Each builder checks the rank it needs and says so.

The MNIST-1D models are those of Greydanus (2020), "Scaling Down Deep Learning" (greydanus/mnist1d,
`notebooks/models.py`, commit 579085a): `cnn1d` is their `ConvBase` and `mlp1d` their `MLPBase`,
layer for layer and without normalisation, as in the paper (which also suits decentralized FL:
no batch statistics to average).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from shared.models import DigitsCNN
from shared.registry import Registry, check_keyword_options

ModelBuilder = Callable[[int, tuple[int, ...]], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")

# fedsam's image models (the DFedSAM reference architectures and the digits CNN) stay in
# fedsam/models.py and are registered here as lazy "module:attr" targets: importing testbeds never
# imports fedsam (fedsam.models imports this module for MODELS and `expect_shape`, so an eager
# import either way would be a cycle), yet the names are always in MODELS, whoever imports it first.
MODELS.register("cnn", target="fedsam.models:digits_cnn")
MODELS.register("resnet18", target="fedsam.models:resnet18")
MODELS.register("vgg11", target="fedsam.models:vgg11")
MODELS.register("resnet18-imagenet", target="testbeds.resnet:resnet18_imagenet")
MODELS.register("resnet50-imagenet", target="testbeds.resnet:resnet50_imagenet")
MODELS.register("hf-classifier", target="testbeds.text_models:hf_classifier")  # lazy: transformers only when used

IMAGE_DIMS = ("channels", "height", "width")
SIGNAL_DIMS = ("channels", "length")


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
    """The model `name` for examples of shape `input_shape` (no batch dimension) and `num_classes` classes;
    `options` are the builder's keyword-only settings (e.g. width=8 for digits-cnn)."""
    builder = MODELS.get(name, "model")
    check_keyword_options(builder, options, f"model '{name}'")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape: expected a tuple of positive integers, got {input_shape!r}")
    return builder(num_classes, shape, **options)


def expect_shape(model: str, input_shape: tuple[int, ...], dims: tuple[str, ...]) -> tuple[int, ...]:
    """`input_shape` if it has one entry per name in `dims`; else a ValueError naming the model and the shape it needs."""
    if len(input_shape) != len(dims):
        raise ValueError(f"input_shape: expected ({', '.join(dims)}) for model '{model}', got {tuple(input_shape)}")
    return tuple(input_shape)


def _conv_out(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvBase1d(nn.Module):
    """MNIST-1D's `ConvBase`: three strided Conv1d-ReLU layers (25 channels, kernels 5, 3, 3, stride 2,
    padding 1) and a linear classifier on the flattened features. The reference hard-codes
    linear_in=125 (25 channels x 5 positions for length 40); here it follows the input length, and
    `in_channels` may exceed the reference's 1."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int] = (1, 40), channels: int = 25) -> None:
        super().__init__()
        in_channels, length = input_shape
        self.in_channels = in_channels
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * _conv_out(_conv_out(_conv_out(length, 5), 3), 3), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and self.in_channels == 1:  # (batch, length), as the reference's data comes
            x = x.unsqueeze(1)
        h = self.conv1(x).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class MLPBase(nn.Module):
    """MNIST-1D's `MLPBase`: linear-ReLU to `hidden` units, one residual hidden layer
    h = h + relu(linear2(h)), and a linear classifier; the input is flattened."""

    def __init__(self, num_classes: int, in_features: int = 40, hidden: int = 100) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x.flatten(1)).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


@MODELS.register("cnn1d")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], *, channels: int = 25) -> nn.Module:
    """MNIST-1D's ConvBase for signals of shape (channels, length), length >= 3."""
    in_channels, length = expect_shape("cnn1d", input_shape, SIGNAL_DIMS)
    if length < 3:
        raise ValueError(f"input_shape: cnn1d's first convolution (kernel 5, padding 1) needs length >= 3, "
                         f"got {tuple(input_shape)}")
    return ConvBase1d(num_classes, (in_channels, length), channels=channels)


@MODELS.register("mlp1d")
def mlp1d(num_classes: int, input_shape: tuple[int, ...], *, hidden: int = 100) -> nn.Module:
    """MNIST-1D's MLP on the flattened input (any shape: (C, L) signals, or images as a baseline)."""
    return MLPBase(num_classes, math.prod(input_shape), hidden=hidden)


@MODELS.register("digits-cnn")
def digits_cnn_bn(num_classes: int, input_shape: tuple[int, ...], *, width: int = 32) -> nn.Module:
    """`samsuite train`'s CNN: `shared.models.DigitsCNN` with batch norm (how the SAM members treat its
    running statistics is part of what the comparison exercises); fedsam's "cnn" is its GroupNorm twin."""
    channels, height, size = expect_shape("digits-cnn", input_shape, IMAGE_DIMS)
    if height < 2 or size < 2:
        raise ValueError(f"input_shape: digits-cnn needs height and width >= 2, got {tuple(input_shape)}")
    return DigitsCNN(num_classes, width=width, in_channels=channels, norm="batch", image_size=(height, size))
