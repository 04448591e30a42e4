"""The models of the DFedSAM experiments, written by hand (there is no CPU torchvision wheel).

DFedSAM (Shi et al., ICML 2023) trains ResNet-18 and VGG-11 with GroupNorm on CIFAR-10/100:
batch statistics would differ from node to node under non-IID data and do not survive model
averaging, so every normalisation is GroupNorm. Both follow the reference code lineage (DisPFL's
`fedml_api/model/cv/{resnet,vgg}.py`, rong-dai/DisPFL, on which DFedSAM's released code builds):
CIFAR-style ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]) and VGG-11 (configuration
"A", one linear head), each with `nn.GroupNorm(32, C)`. The digits model is `shared.models.DigitsCNN`
with GroupNorm. The registry is the suite's one `testbeds.models.MODELS`, which names these builders as
lazy targets ("fedsam.models:resnet18" ...); `MODELS` and `build_model` are re-exported here.
"""

from __future__ import annotations

from torch import Tensor, nn

from shared.models import DigitsCNN
from testbeds.models import IMAGE_DIMS, MODELS, ModelBuilder, build_model, expect_shape

__all__ = [
    "MODELS",
    "NORM_GROUPS",
    "VGG11",
    "BasicBlock",
    "ModelBuilder",
    "ResNet18",
    "build_model",
    "digits_cnn",
    "resnet18",
    "vgg11",
]

NORM_GROUPS = 32  # GroupNorm groups in ResNet-18 and VGG-11, as in the reference code
NORMS = ("group", "batch")  # resnet18's `norm` option: GroupNorm (FL) or BatchNorm (the centralized SAM papers)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(NORM_GROUPS, channels) if kind == "group" else nn.BatchNorm2d(channels)
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # configuration "A"


def digits_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """`DigitsCNN` with GroupNorm, its input layer and head sized for `input_shape`."""
    channels, height, width = expect_shape("cnn", input_shape, IMAGE_DIMS)
    if height < 2 or width < 2:
        raise ValueError(f"input_shape: cnn needs height and width >= 2, got {input_shape}")
    return DigitsCNN(num_classes, in_channels=channels, norm="group", image_size=(height, width))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers plus the identity, or a strided 1x1 conv-norm where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _norm(norm, planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 with GroupNorm (or BatchNorm, `norm="batch"`, as kuangliu/pytorch-cifar that
    the SAM, SAF and USEFUL papers train); global average pooling makes it fit any image size (on 32x32 it
    equals the reference's 4x4 average pool)."""

    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), _norm(norm, 64),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


class VGG11(nn.Module):
    """VGG-11 (configuration "A": 8 conv-GN-ReLU layers, 5 max-pools) and one linear head; weights
    initialised as in the reference (Kaiming-normal fan-out convs, N(0, 0.01) head, zero biases)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for v in VGG11_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.GroupNorm(NORM_GROUPS, int(v)), nn.ReLU(True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512 * (height // 32) * (width // 32), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def resnet18(num_classes: int, input_shape: tuple[int, ...], *, norm: str = "group") -> nn.Module:
    """CIFAR-style ResNet-18 for images (C, H, W) of any size; `norm`: "group" (FL) or "batch"."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    return ResNet18(num_classes, in_channels=expect_shape("resnet18", input_shape, IMAGE_DIMS)[0], norm=norm)


def vgg11(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """VGG-11 with GroupNorm for images (C, H, W) of at least 32x32."""
    channels, height, width = expect_shape("vgg11", input_shape, IMAGE_DIMS)
    if height < 32 or width < 32:
        raise ValueError(f"input_shape: vgg11 pools five times and needs height and width >= 32, got {input_shape}")
    return VGG11(num_classes, (channels, height, width))
