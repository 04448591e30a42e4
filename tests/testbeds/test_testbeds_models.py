"""testbeds.models: the one model registry; the MNIST-1D models against the reference architecture
(greydanus/mnist1d `notebooks/models.py`), shapes, parameter counts by hand, lazy fedsam models, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from testbeds.models import MODELS, ConvBase1d, MLPBase, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ReferenceConvBase(nn.Module):
    """The reference's ConvBase (notebooks/models.py, commit 579085a), its print left out."""

    def __init__(self, output_size: int, channels: int = 25, linear_in: int = 125) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(linear_in, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, x.shape[-1])
        h3 = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.linear(h3.view(h3.shape[0], -1))


class ReferenceMLPBase(nn.Module):
    """The reference's MLPBase (notebooks/models.py), its print left out."""

    def __init__(self, input_size: int, output_size: int, hidden_size: int = 100) -> None:
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


def conv_out(length: int, kernel: int) -> int:
    return (length + 2 * 1 - kernel) // 2 + 1  # stride 2, padding 1


def cnn1d_count(num_classes: int, channels_in: int, length: int) -> int:
    positions = conv_out(conv_out(conv_out(length, 5), 3), 3)
    return 25 * channels_in * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 25 * positions * num_classes + num_classes


def mlp1d_count(num_classes: int, features: int) -> int:
    return features * 100 + 100 + 100 * 100 + 100 + 100 * num_classes + num_classes


def test_reference_sizes_for_mnist1d() -> None:
    # ConvBase for length 40: 25*1*5+25 + 2*(25*25*3+25) + 125*10+10 = 5,210; linear_in = 125 (25 channels x 5).
    assert n_params(build_model("cnn1d", 10, (1, 40))) == 25 * 1 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 125 * 10 + 10
    assert n_params(build_model("cnn1d", 10, (1, 40))) == 5_210 == n_params(ReferenceConvBase(10))
    assert build_model("cnn1d", 10, (1, 40)).linear.in_features == 125
    # MLPBase: 40*100+100 + 100*100+100 + 100*10+10 = 15,210.
    assert n_params(build_model("mlp1d", 10, (1, 40))) == 15_210 == n_params(ReferenceMLPBase(40, 10))


@pytest.mark.parametrize(
    ("name", "num_classes", "shape", "expected"),
    [
        ("cnn1d", 10, (1, 40), cnn1d_count(10, 1, 40)),
        ("cnn1d", 3, (2, 100), cnn1d_count(3, 2, 100)),
        ("cnn1d", 10, (1, 3), cnn1d_count(10, 1, 3)),
        ("mlp1d", 10, (1, 40), mlp1d_count(10, 40)),
        ("mlp1d", 5, (2, 64), mlp1d_count(5, 128)),
        ("mlp1d", 10, (1, 8, 8), mlp1d_count(10, 64)),  # an MLP on flattened images, as a baseline
    ],
)
def test_output_shape_and_parameter_count(name: str, num_classes: int, shape: tuple[int, ...], expected: int) -> None:
    model = build_model(name, num_classes, shape)
    assert model(torch.randn(4, *shape)).shape == (4, num_classes)
    assert n_params(model) == expected


def test_cnn1d_is_the_reference_convbase() -> None:
    torch.manual_seed(0)
    ref = ReferenceConvBase(10)
    ours = build_model("cnn1d", 10, (1, 40))
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes (strict)
    x = torch.randn(6, 1, 40)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x.squeeze(1)), ref(x))  # (batch, length) as the reference's data comes
    assert not [m for m in ours.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]


def test_mlp1d_is_the_reference_mlp_with_its_residual_layer() -> None:
    torch.manual_seed(0)
    ref = ReferenceMLPBase(40, 10)
    ours = build_model("mlp1d", 10, (1, 40))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 1, 40)
    torch.testing.assert_close(ours(x), ref(x.flatten(1)))
    # h = relu(W1 x + b1); h = h + relu(W2 h + b2); out = W3 h + b3, in float64
    w = {k: v.double() for k, v in ref.state_dict().items()}
    h = torch.relu(x.flatten(1).double() @ w["linear1.weight"].T + w["linear1.bias"])
    h = h + torch.relu(h @ w["linear2.weight"].T + w["linear2.bias"])
    torch.testing.assert_close(ours(x).double(), h @ w["linear3.weight"].T + w["linear3.bias"], rtol=1e-5, atol=1e-5)


def test_classes_are_exported() -> None:
    assert isinstance(build_model("cnn1d", 10, (1, 40)), ConvBase1d)
    assert isinstance(build_model("mlp1d", 10, (1, 40)), MLPBase)


def _needs_options(name: str) -> bool:
    """Models with a required option (hf-classifier's `pretrained` checkpoint, for token inputs:
    tests/testbeds/test_text.py) cannot build from a shape alone."""
    import inspect

    return any(p.kind is p.KEYWORD_ONLY and p.default is p.empty
               for p in inspect.signature(MODELS.get(name)).parameters.values())


@pytest.mark.parametrize("name", [n for n in MODELS.names() if not _needs_options(n)])
def test_every_registered_model_builds_for_images_or_signals(name: str) -> None:
    built = []
    for shape in ((3, 32, 32), (1, 40)):
        try:
            model = build_model(name, 10, shape)
        except ValueError as err:
            assert str(err).startswith("input_shape: ")
            continue
        assert model(torch.randn(2, *shape)).shape == (2, 10)
        built.append(shape)
    assert built, f"{name} builds for neither images nor signals"


def test_one_registry_shared_with_fedsam() -> None:
    import fedsam.models

    assert fedsam.models.MODELS is MODELS and fedsam.models.build_model is build_model
    assert {"cnn", "cnn1d", "mlp1d", "resnet18", "vgg11"} <= set(MODELS.names())
    assert isinstance(build_model("resnet18", 10, (3, 32, 32)), fedsam.models.ResNet18)


def test_importing_testbeds_models_does_not_import_fedsam() -> None:
    code = (
        "import sys; from testbeds.models import MODELS, build_model\n"
        "assert 'resnet18' in MODELS and 'fedsam.models' not in sys.modules, 'eager'\n"
        "build_model('vgg11', 10, (3, 32, 32)); assert 'fedsam.models' in sys.modules, 'not loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])  # the repo root


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("cnn1d", (3, 32, 32), r"input_shape: expected \(channels, length\) for model 'cnn1d', got \(3, 32, 32\)"),
        ("cnn1d", (40,), r"input_shape: expected \(channels, length\) for model 'cnn1d', got \(40,\)"),
        ("cnn1d", (1, 2), r"input_shape: cnn1d's first convolution .* needs length >= 3"),
        ("resnet18", (1, 40), r"input_shape: expected \(channels, height, width\) for model 'resnet18', got \(1, 40\)"),
        ("vgg11", (1, 40), r"input_shape: expected \(channels, height, width\) for model 'vgg11'"),
        ("cnn", (1, 40), r"input_shape: expected \(channels, height, width\) for model 'cnn'"),
        ("cnn1d", (0, 40), r"input_shape: expected a tuple of positive integers, got \(0, 40\)"),
        ("cnn1d", (1, 40.0), r"input_shape: expected a tuple of positive integers"),
        ("mlp1d", (), r"input_shape: expected a tuple of positive integers, got \(\)"),
        ("mlp1d", 40, r"input_shape: expected a tuple of positive integers, got 40"),
    ],
)
def test_bad_shapes_are_clear_errors(name: str, shape: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, 10, shape)  # type: ignore[arg-type]


def test_bad_names_and_classes() -> None:
    with pytest.raises(ValueError, match=r"model: unknown model 'cnn2d'; did you mean 'cnn1d'\?"):
        build_model("cnn2d", 10, (1, 40))
    with pytest.raises(ValueError, match=r"num_classes: expected an integer >= 2, got 1"):
        build_model("cnn1d", 1, (1, 40))
    with pytest.raises(ValueError, match=r"num_classes: expected an integer >= 2, got True"):
        build_model("mlp1d", True, (1, 40))  # type: ignore[arg-type]
