"""ImageNet-style ResNet-18 and ResNet-50 for the paper-scale domain-generalization configs (PACS, DomainBed).

DomainBed (and SAGM, UDIM, GAQAT, which build on it) fine-tunes an ImageNet-pretrained torchvision ResNet with
batch norm frozen, dropout before a fresh head. The network here is torchvision's `ResNet` written by hand (there is
no torchvision wheel for our torch): 7x7/2 stem, 3x3/2 max-pool, BasicBlock [2, 2, 2, 2] or Bottleneck [3, 4, 6, 3]
with the stride on the 3x3 conv ("v1.5"), 1x1 conv + BN downsample, global average pool, `fc`. Module names are
torchvision's, which timm's ResNet shares, so both libraries' ImageNet state dicts load without renaming.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from testbeds.models import IMAGE_DIMS, expect_shape

HUB_PREFIX = "hub:"
HUB_FILENAME = "model.safetensors"  # the file timm publishes on the hub (timm/resnet18.a1_in1k, ...)
MIN_SIZE = 32  # five stride-2 stages: smaller images would shrink below 1x1
HEAD_KEYS = ("fc.weight", "fc.bias")  # the ImageNet head of a weights file, replaced by a fresh one
# Old torchvision files (resnet18-5c106cde.pth) predate this buffer; BatchNorm sets it to 0 when it is absent.
OPTIONAL_SUFFIX = ".num_batches_tracked"
SHOWN_KEYS = 5  # offending keys named in an error message


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv-BN layers (the stride on the first) plus the shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5): 1x1 reduce, 3x3 with the stride, 1x1 expand by 4, plus the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet with DomainBed's two additions: dropout before `fc`, and `freeze_bn`, which keeps every
    BatchNorm in eval mode (running statistics of the pretrained network, not of the small fine-tuning batches) even
    in `train()`; the BN affine parameters still train."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int,
                 *, freeze_bn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.in_planes = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's init; nn.Linear keeps its default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.train()  # a new module is in training mode: apply freeze_bn from the start

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.in_planes != out_planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, out_planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_planes))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def train(self, mode: bool = True) -> ImageNetResNet:
        """Set the mode; with `freeze_bn`, batch norm stays in eval mode (as DomainBed's `ResNet.train`)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))


def _read_state_dict(weights: str) -> dict[str, Tensor]:
    """The tensors of `weights`: a local .safetensors/.pth/.pt file, or "hub:<repo id>"'s model.safetensors."""
    if weights.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repo = weights[len(HUB_PREFIX):]
        try:
            path = Path(hf_hub_download(repo, HUB_FILENAME))
        except (OSError, EntryNotFoundError, ValueError) as err:  # offline, no such repo or file, bad repo id
            raise ValueError(f"weights: cannot get {HUB_FILENAME} of '{repo}' from the Hugging Face hub "
                             f"(unreachable, or no such repo or file): {err}") from err
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"weights: no such file {weights!r} (expected a .safetensors/.pth/.pt file or "
                             f"'{HUB_PREFIX}<repo id>')")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"weights: expected a .safetensors, .pth or .pt file, got {weights!r}")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights: {weights!r} is not a flat state dict of tensors (torchvision/timm layout)")
    return dict(state)


def load_imagenet_weights(model: ImageNetResNet, weights: str) -> None:
    """Load an ImageNet state dict into `model` except its head (DomainBed's practice: a fresh `num_classes` head);
    any other missing, unexpected or misshapen key is an error, so a wrong file never loads half-way."""
    state = {k: v for k, v in _read_state_dict(weights).items() if k not in HEAD_KEYS}
    own = {k: v for k, v in model.state_dict().items() if k not in HEAD_KEYS}
    missing = [k for k in own if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"weights: {weights!r} does not fit the model: missing keys {missing[:SHOWN_KEYS]}, "
                         f"unexpected keys {unexpected[:SHOWN_KEYS]}")
    misshapen = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if misshapen:
        raise ValueError(f"weights: {weights!r} has tensors of the wrong shape: {misshapen[:SHOWN_KEYS]}")
    model.load_state_dict({**model.state_dict(), **state})


def _build(name: str, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int,
           input_shape: tuple[int, ...], weights: str | None, freeze_bn: bool, dropout: float) -> ImageNetResNet:
    channels, height, width = expect_shape(name, input_shape, IMAGE_DIMS)
    if channels != 3:
        raise ValueError(f"input_shape: {name} takes RGB images (3 channels, as its ImageNet weights), "
                         f"got {tuple(input_shape)}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"input_shape: {name} downsamples 32-fold and needs height and width >= {MIN_SIZE}, "
                         f"got {tuple(input_shape)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"weights: expected None, a file path or '{HUB_PREFIX}<repo id>', got {weights!r}")
    model = ImageNetResNet(block, layers, num_classes, freeze_bn=bool(freeze_bn), dropout=float(dropout))
    if weights is not None:
        load_imagenet_weights(model, weights)
    return model


def resnet18_imagenet(num_classes: int, input_shape: tuple[int, ...], *, weights: str | None = None,
                      freeze_bn: bool = True, dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet-18 for RGB images of at least 32x32; `weights`: None, a local file or "hub:<repo id>"."""
    return _build("resnet18-imagenet", BasicBlock, (2, 2, 2, 2), num_classes, input_shape, weights, freeze_bn, dropout)


def resnet50_imagenet(num_classes: int, input_shape: tuple[int, ...], *, weights: str | None = None,
                      freeze_bn: bool = True, dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet-50 (v1.5) for RGB images of at least 32x32; `weights` as for resnet18_imagenet."""
    return _build("resnet50-imagenet", Bottleneck, (3, 4, 6, 3), num_classes, input_shape, weights, freeze_bn, dropout)
