"""`load_model` on folders whose weights it must not or cannot load: pickled PyTorch weights are
refused, truncated or corrupt safetensors and missing shards are named, and a path that exists
nowhere is named; each is one line, raised before `from_pretrained` is called."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from unlearn import models as models_module
from unlearn.models import ModelLoadError, load_model, smollm2_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama and the SmolLM2 tokenizer saved as a Hugging Face folder (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def no_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks come first: from_pretrained is never reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(models_module.AutoModelForCausalLM, "from_pretrained", refuse)


def copy_without_weights(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    (folder / "model.safetensors").unlink()
    return folder


def one_line_error(spec: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content", ["state_dict", "objects"])
def test_pickled_weights_are_refused(saved, tmp_path, no_from_pretrained, content: str) -> None:
    """A state dict (which transformers would unpickle with weights_only) and a pickle of objects (whose
    UnpicklingError traceback the old code showed): both refused, the file named."""
    folder = copy_without_weights(saved, tmp_path)
    state = saved[1].state_dict() if content == "state_dict" else {"config": argparse.Namespace(lr=1.0)}
    torch.save(state, folder / "pytorch_model.bin")
    message = one_line_error(str(folder))
    assert message.startswith(f"model: {folder / 'pytorch_model.bin'}: pickled PyTorch weights are refused "
                              "(they can run code); save it as safetensors (model.save_pretrained(dir, "
                              "safe_serialization=True))")
    assert "accepted: a folder with config.json and safetensors weights" in message and "'smollm2'" in message
    assert "a .gguf file" in message and "a peft adapter folder" in message
    # the file itself, given as the model
    assert "pickled PyTorch weights are refused" in one_line_error(str(folder / "pytorch_model.bin"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_are_named(saved, tmp_path, no_from_pretrained, damage: str) -> None:
    folder = copy_without_weights(saved, tmp_path)
    data = (saved[0] / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage]
    (folder / "model.safetensors").write_bytes(broken)
    message = one_line_error(str(folder))
    assert re.match(rf"model: {re.escape(str(folder / 'model.safetensors'))}: not a readable safetensors file "
                    r"\(.+\); it may be truncated or corrupt", message), message
    assert "accepted: " in message


def test_sharded_weights_with_a_missing_shard(saved, tmp_path, no_from_pretrained) -> None:
    folder = copy_without_weights(saved, tmp_path)
    shutil.copy(saved[0] / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = one_line_error(str(folder))
    assert message == (f"model: {folder / 'model.safetensors.index.json'} names 1 missing shard(s), e.g. "
                       f"{folder / 'model-00002-of-00002.safetensors'}; copy the whole folder")


def test_a_folder_without_weights_and_a_bad_config(saved, tmp_path, no_from_pretrained) -> None:
    folder = copy_without_weights(saved, tmp_path)
    assert one_line_error(str(folder)).startswith(f"model: {folder} holds no weights (model.safetensors); accepted: ")
    (folder / "config.json").write_text("{not json")
    assert one_line_error(str(folder)).startswith(f"model: {folder / 'config.json'}: not a readable JSON file")


def test_adapter_with_pickled_weights_is_refused(saved, tmp_path, no_from_pretrained) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(saved[0])}))
    torch.save({"w": torch.zeros(2)}, adapter / "adapter_model.bin")
    message = one_line_error(str(adapter))
    assert message.startswith(f"adapter: {adapter / 'adapter_model.bin'}: pickled PyTorch weights are refused")


@pytest.mark.parametrize("spec", ["no such folder", "runs\\unlearned", "runs/x/final", "./missing", "model.gguf"])
def test_a_path_that_is_nowhere_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch, no_from_pretrained,
                                         spec: str) -> None:
    """Not a file, not a folder, and not shaped like a hub id (org/name): named, no hub lookup."""
    monkeypatch.chdir(tmp_path)
    message = one_line_error(spec)
    assert message.startswith(f"model: no such file or folder: {spec} (nor is it a hub id such as org/name); "
                              "accepted: ")


def test_a_good_folder_still_loads_from_safetensors_only(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_safetensors"))
        return original(*args, **kwargs)

    monkeypatch.setattr(models_module.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(str(saved[0]), dtype="float32")
    assert seen == [True]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved[1](ids).logits, rtol=0, atol=0)
