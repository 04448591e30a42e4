"""testbeds.resnet: torchvision's ImageNet ResNet-18/50 (sizes, state-dict layout), loading weights files with a
fresh head, DomainBed's frozen batch norm and dropout, and the argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from testbeds import build_model
from testbeds.resnet import ImageNetResNet, resnet18_imagenet, resnet50_imagenet

# torchvision.models.resnet18().state_dict(): its first and last keys, and the sizes of both models
TORCHVISION_R18_FIRST = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                         "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                         "layer1.0.bn1.bias", "layer1.0.bn1.running_mean", "layer1.0.bn1.running_var",
                         "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight"]
TORCHVISION_R18_LAST = ["layer4.1.bn2.weight", "layer4.1.bn2.bias", "layer4.1.bn2.running_mean",
                        "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"]
TORCHVISION_SIZES = {  # parameters with a 1000-class head, state-dict entries
    "resnet18": (resnet18_imagenet, 11_689_512, 122),
    "resnet50": (resnet50_imagenet, 25_557_032, 320),
}


def _random_imagenet_state(tmp_path: Path, suffix: str, *, drop: str | None = None,
                           rename: tuple[str, str] | None = None, reshape: str | None = None) -> tuple[Path, dict]:
    """A random ResNet-18 state dict with a 1000-class head, written to a file; optionally one key dropped,
    renamed or given a wrong shape."""
    torch.manual_seed(0)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else torch.randint_like(v, 1, 100))
             for k, v in resnet18_imagenet(1000, (3, 224, 224)).state_dict().items()}
    if drop:
        del state[drop]
    if rename:
        state[rename[1]] = state.pop(rename[0])
    if reshape:
        state[reshape] = torch.randn(*state[reshape].shape[:-1], state[reshape].shape[-1] + 1)
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path, state


def _bn_stats(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_SIZES))
def test_sizes_equal_torchvision(arch: str) -> None:
    factory, params, entries = TORCHVISION_SIZES[arch]
    model = factory(1000, (3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


def test_state_dict_keys_in_torchvision_layout() -> None:
    keys = list(resnet18_imagenet(10, (3, 64, 64)).state_dict())
    assert keys[:len(TORCHVISION_R18_FIRST)] == TORCHVISION_R18_FIRST
    assert keys[-len(TORCHVISION_R18_LAST):] == TORCHVISION_R18_LAST
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)  # BasicBlock: 64 -> 64 needs none
    r50 = resnet50_imagenet(10, (3, 64, 64)).state_dict()
    assert "layer1.0.downsample.0.weight" in r50 and r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3) and r50["fc.weight"].shape == (10, 2048)


def test_torchvision_init() -> None:
    model = resnet18_imagenet(10, (3, 64, 64))
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k)) = sqrt(2 / (64 * 49))
    assert model.conv1.weight.std().item() == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.05)


def test_output_shapes() -> None:
    assert resnet18_imagenet(5, (3, 64, 64))(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert resnet50_imagenet(4, (3, 32, 32))(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_build_through_registry() -> None:
    model = build_model("resnet18-imagenet", 7, (3, 64, 64))
    assert isinstance(model, ImageNetResNet)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    model = build_model("resnet18-imagenet", 7, (3, 64, 64), dropout=0.5, freeze_bn=False)
    assert model.dropout.p == 0.5 and not model.freeze_bn


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_weights_file_loads_every_layer_but_the_head(tmp_path: Path, suffix: str) -> None:
    path, state = _random_imagenet_state(tmp_path, suffix)
    loaded = resnet18_imagenet(7, (3, 64, 64), weights=str(path)).state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        if key.startswith("fc."):
            assert loaded[key].shape[0] == 7  # a fresh 7-class head
        else:
            assert torch.equal(loaded[key], value), key


def test_weights_without_num_batches_tracked_load(tmp_path: Path) -> None:
    # old torchvision files (resnet18-5c106cde.pth) and headless checkpoints lack these keys
    path, state = _random_imagenet_state(tmp_path, ".safetensors", drop="bn1.num_batches_tracked")
    loaded = resnet18_imagenet(3, (3, 64, 64), weights=str(path)).state_dict()
    assert torch.equal(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("edit, match", [
    ({"rename": ("layer3.1.conv2.weight", "layer3.1.conv9.weight")},
     r"^weights: .*missing keys \['layer3.1.conv2.weight'\], unexpected keys \['layer3.1.conv9.weight'\]"),
    ({"drop": "layer2.0.downsample.1.weight"}, r"^weights: .*missing keys \['layer2.0.downsample.1.weight'\]"),
    ({"reshape": "layer1.1.bn1.bias"}, r"^weights: .*wrong shape.*layer1.1.bn1.bias \(65,\) != \(64,\)"),
])
def test_weights_that_do_not_fit_are_refused(tmp_path: Path, edit: dict, match: str) -> None:
    path, _ = _random_imagenet_state(tmp_path, ".safetensors", **edit)
    with pytest.raises(ValueError, match=match):
        resnet18_imagenet(7, (3, 64, 64), weights=str(path))


def test_resnet18_weights_do_not_load_into_resnet50(tmp_path: Path) -> None:
    path, _ = _random_imagenet_state(tmp_path, ".pt")
    with pytest.raises(ValueError, match=r"^weights: .*missing keys \[.*layer1.0.conv3.weight"):
        resnet50_imagenet(7, (3, 32, 32), weights=str(path))


def test_bad_weights_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^weights: no such file"):
        resnet18_imagenet(7, (3, 64, 64), weights=str(tmp_path / "absent.safetensors"))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^weights: expected a \.safetensors, \.pth or \.pt file"):
        resnet18_imagenet(7, (3, 64, 64), weights=str(tmp_path / "w.bin"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="^weights: .*not a flat state dict"):
        resnet18_imagenet(7, (3, 64, 64), weights=str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="^weights: expected None"):
        resnet18_imagenet(7, (3, 64, 64), weights=3)  # type: ignore[arg-type]


def test_hub_weights_download_model_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    path, state = _random_imagenet_state(tmp_path, ".safetensors")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: calls.append((repo, name)) or str(path))
    loaded = resnet18_imagenet(7, (3, 64, 64), weights="hub:timm/resnet18.a1_in1k").state_dict()
    assert calls == [("timm/resnet18.a1_in1k", "model.safetensors")]
    assert torch.equal(loaded["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])


def test_hub_weights_missing_file_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def missing(repo: str, name: str) -> str:
        raise EntryNotFoundError(f"404: {name} not in {repo}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(ValueError, match="^weights: cannot get model.safetensors of 'someone/resnet'.*404"):
        resnet18_imagenet(7, (3, 64, 64), weights="hub:someone/resnet")


def test_hub_unreachable_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, never the network
    with pytest.raises(ValueError, match="^weights: cannot get model.safetensors of 'samsuite-tests/no-such-resnet'"):
        resnet18_imagenet(7, (3, 64, 64), weights="hub:samsuite-tests/no-such-resnet")


def test_freeze_bn_keeps_running_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet18_imagenet(3, (3, 32, 32))
    model.eval()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and model.dropout.training and model.layer1[0].conv1.training
    assert len(bns) == 20 and not any(m.training for m in bns)
    before = _bn_stats(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(model).items())
    assert model.bn1.weight.grad is not None  # the affine parameters still train

    free = resnet18_imagenet(3, (3, 32, 32), freeze_bn=False)
    free.train()
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))
    before = _bn_stats(free)
    free(torch.randn(2, 3, 32, 32))
    after = _bn_stats(free)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert after["layer4.1.bn2.num_batches_tracked"].item() == 1


def test_dropout_acts_before_the_head_in_training_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = resnet18_imagenet(3, (3, 32, 32), dropout=0.5).train()  # frozen BN: only dropout is random
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = resnet18_imagenet(3, (3, 32, 32)).train()
    assert torch.equal(plain(x), plain(x))


@pytest.mark.parametrize("shape, match", [
    ((1, 64, 64), r"^input_shape: resnet18-imagenet takes RGB images \(3 channels"),
    ((3, 16, 64), r"^input_shape: .*height and width >= 32"),
    ((3, 64, 31), r"^input_shape: .*height and width >= 32"),
    ((3, 64), r"^input_shape: expected \(channels, height, width\)"),
])
def test_bad_input_shape(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resnet18_imagenet(7, shape)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, True, "0.5"])
def test_bad_dropout(dropout: object) -> None:
    with pytest.raises(ValueError, match=r"^dropout: expected a number in \[0, 1\)"):
        resnet50_imagenet(7, (3, 32, 32), dropout=dropout)  # type: ignore[arg-type]
