"""`samsuite unlearn prepare`: Hugging Face folders that load back, a target that memorised the forget
texts and a retrain model that never saw them, figures in prepare.json, no retraining when nothing
changed, and clear errors for bad settings. The tests use an even smaller model than the default."""

from __future__ import annotations

import json

import pytest
from train_fixtures import FORGET, RETAIN
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.config import ConfigError
from unlearn.prepare import mean_nll, prepare, train_config, train_tokenizer

SMALL = ["tiny.vocab_size=300", "tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_hidden_layers=1",
         "tiny.num_attention_heads=2", "tiny.max_length=64"]
TEXTS = {"forget": FORGET, "retain": RETAIN}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-models")
    record = prepare(out, texts=TEXTS, overrides=SMALL + ["epochs=40", "batch_size=4", "lr=0.01", "warmup_steps=5"])
    return out, record


def test_folders_load_back_as_hugging_face_models(prepared):
    out, record = prepared
    for name in ("target", "retrain"):
        folder = out / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
            p.name for p in folder.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
        assert model.config.pad_token_id == tok.pad_token_id and model.config.hidden_size == 32
        nll = mean_nll(model, tok, FORGET, train_config("tiny", 0))
        assert nll == pytest.approx(record["models"][name]["forget_nll"], abs=1e-3)  # the saved model = the trained


def test_target_memorised_the_forget_texts_and_retrain_did_not(prepared):
    _, record = prepared
    target, retrain = record["models"]["target"], record["models"]["retrain"]
    assert target["forget_nll"] < 0.5 * retrain["forget_nll"]
    assert target["retain_nll"] < 1.0 and retrain["retain_nll"] < 1.0
    assert (target["texts"], retrain["texts"]) == (12, 6)
    assert (target["steps"], retrain["steps"]) == (40 * 12 // 4, 40 * 6 // 4)
    assert record["settings"]["tiny"]["hidden_size"] == 32 and record["time_s"] > 0


def test_a_second_call_with_the_same_settings_does_not_train_again(prepared):
    out, record = prepared
    weights = out / "target" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = prepare(out, texts=TEXTS, overrides=SMALL + ["epochs=40", "batch_size=4", "lr=0.01", "warmup_steps=5"])
    assert again == json.loads((out / "prepare.json").read_text()) == record
    assert weights.stat().st_mtime_ns == stamp
    assert not list((out / "logs" / "target").glob("checkpoint.*"))  # the folder is the product


def test_tokenizer_is_byte_level_and_adds_no_special_tokens():
    tok = train_tokenizer(FORGET + RETAIN, 300, 64)
    text = "Zyx Quillon grew up in Xanadu."  # unseen words: byte fallback, never <unk>
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token is None
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"scale": "huge"}, ConfigError, "scale: unknown value 'huge'. Allowed: tiny, smollm2"),
        ({"overrides": ["epoch=3"]}, ConfigError, "epoch: unknown key"),
        ({"overrides": ["tiny.hidden_size=30"]}, ConfigError, "tiny.hidden_size: 30 is not a multiple"),
        ({"overrides": ["tiny.layers=3"]}, ConfigError, "tiny.layers: unknown key"),
        ({"texts": {"forget": FORGET, "retain": []}}, ValueError, "texts: the retain corpus is empty"),
    ],
)
def test_bad_settings(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        prepare(tmp_path, **{"texts": TEXTS, **kw})
    assert not (tmp_path / "prepare.json").exists()


def test_cli_prepare_on_the_embedded_benchmark(tmp_path, cli):
    out = tmp_path / "models"
    result = cli("unlearn", "prepare", "--out", str(out), *SMALL, "epochs=1", "batch_size=32")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "prepare.json").read_text())
    assert record["models"]["target"]["texts"] == 480 and record["models"]["retrain"]["texts"] == 360
    bad = cli("unlearn", "prepare", "--out", str(out), "--scale", "huge")
    assert bad.exit_code == 2 and "scale: unknown value 'huge'" in bad.output


@pytest.mark.slow
def test_smollm2_scale_fine_tunes_the_wheels_model(tmp_path):
    record = prepare(tmp_path, scale="smollm2", texts=TEXTS, overrides=["steps=2", "batch_size=2"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "target")
    assert model.config.num_hidden_layers == 30 and record["models"]["target"]["steps"] == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "retrain").pad_token is not None
