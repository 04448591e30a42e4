"""`model_max_length`, our copy of HFLM's rule for the context length it truncates to, against the
expected values and against lm-eval's own `resolve_max_length` where the installed lm-eval has it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from unlearn.eval.mc import DEFAULT_MAX_LENGTH, model_max_length

UNSET = int(1e30)  # transformers' model_max_length of a tokenizer that sets none


def composite() -> PretrainedConfig:
    """A config whose top level holds an encoder's length, its text model another (as Gemma3, Qwen2-VL)."""
    config = PretrainedConfig()
    config.max_position_embeddings = 1200
    config.text_config = LlamaConfig(max_position_embeddings=32768)
    return config


CASES = [
    ("llama", LlamaConfig(max_position_embeddings=256), SimpleNamespace(model_max_length=8192), 256),
    ("gpt2", GPT2Config(n_positions=1024), SimpleNamespace(model_max_length=512), 1024),
    ("no-length-config, tokenizer length", PretrainedConfig(), SimpleNamespace(model_max_length=512), 512),
    ("no-length-config, tokenizer unset", PretrainedConfig(), SimpleNamespace(model_max_length=UNSET), 2048),
    ("no-length-config, no tokenizer", PretrainedConfig(), None, 2048),
    ("text_config first", composite(), None, 32768),
]


@pytest.mark.parametrize("name, config, tokenizer, expected", CASES, ids=[c[0] for c in CASES])
def test_model_max_length(name: str, config, tokenizer, expected: int) -> None:
    assert DEFAULT_MAX_LENGTH == 2048
    assert model_max_length(config, tokenizer) == expected


@pytest.mark.parametrize("name, config, tokenizer, expected", CASES, ids=[c[0] for c in CASES])
def test_model_max_length_equals_lm_evals(name: str, config, tokenizer, expected: int) -> None:
    utils = pytest.importorskip("lm_eval.models.utils")
    if not hasattr(utils, "resolve_max_length"):
        pytest.skip("this lm-eval has no resolve_max_length (HFLM.max_length inlines the rule)")
    assert utils.DEFAULT_MAX_LENGTH == DEFAULT_MAX_LENGTH and utils.TOKENIZER_INFINITY == UNSET
    assert model_max_length(config, tokenizer) == utils.resolve_max_length(config, tokenizer,
                                                                           default=utils.DEFAULT_MAX_LENGTH)


def test_hflm_on_a_tiny_model_uses_the_same_length(tokenizer) -> None:
    """HFLM itself, on a model object: its `max_length` is ours."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=96))
    assert HFLM(pretrained=model, tokenizer=tokenizer).max_length == model_max_length(model.config, tokenizer) == 96
