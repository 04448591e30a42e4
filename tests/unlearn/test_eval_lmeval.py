"""lm-evaluation-harness itself, offline, on a tiny random Llama with the real SmolLM2 tokenizer: our
scorer gives the same accuracy and the same log-likelihoods (within 1e-4). And `samsuite unlearn
eval` with either backend: the JSON it writes, and its errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.benchmarks import load_benchmark
from unlearn.eval.lmeval import lm_eval_mc
from unlearn.eval.mc import score_mc
from unlearn.models import load_model, smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama and the SmolLM2 tokenizer, in memory and saved as a model folder."""
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def questions() -> Dataset:
    """The toy benchmark's questions plus awkward ones: whitespace around the question and choices,
    no subject, an MMLU subject with underscores."""
    toy = load_benchmark("toy").mc["forget"].select(range(10))
    odd = Dataset.from_dict({
        "question": ["  Where did Alan grow up? ", "Which colour?\n\n", "Who employs Cy?"],
        "choices": [["Millbrook", " Oakhurst", "Glen hallow ", "Brindlecombe"], ["red", "teal", "", "x"],
                    ["Mossgate Bank", "A & B", "<none>", "Ünïcode"]],
        "answer": [2, 1, 3],
        "subject": ["high_school_biology", "", "biology"],
    }).cast(toy.features)
    return concatenate_datasets([toy, odd])


def test_our_scorer_equals_lm_eval(tiny) -> None:
    model, tokenizer, _ = tiny
    data = questions()
    official = lm_eval_mc(model, tokenizer, {"forget": data, "utility": data.select(range(4))}, batch_size=4)
    ours = score_mc(model, tokenizer, data, batch_size=5)
    assert official["forget"].loglikelihoods.shape == (len(data), 4)
    np.testing.assert_allclose(ours.loglikelihoods, official["forget"].loglikelihoods, rtol=0, atol=1e-4)
    assert ours.acc == official["forget"].acc
    assert (official["forget"].answers == np.array(data["answer"])).all()
    np.testing.assert_allclose(official["utility"].loglikelihoods, official["forget"].loglikelihoods[:4], atol=1e-5)


def test_lm_eval_backend_checks_its_input(tiny) -> None:
    model, tokenizer, _ = tiny
    bad = Dataset.from_dict({"question": ["Q"], "choices": [["a", "b"]], "answer": [0]})
    with pytest.raises(ValueError, match=r"forget\[0\].choices: expected a list of 4 strings"):
        lm_eval_mc(model, tokenizer, {"forget": bad})


@pytest.fixture
def run_eval(cli):
    return lambda *args: cli("unlearn", "eval", *args)


def test_cli_writes_the_record(tiny, tmp_path, run_eval) -> None:
    _, _, folder = tiny
    out = tmp_path / "eval.json"
    result = run_eval("--model", str(folder), "--benchmark", "toy", "--max-samples", "3", "--batch-size", "8",
                      "--output", str(out), "--retrain", str(folder))
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["model"]["spec"] == str(folder) and record["model"]["trust_remote_code"] is False
    assert record["benchmark"]["name"] == "toy" and record["config"]["backend"] == "ours"
    assert record["config"]["max_samples"] == 3
    assert {"torch", "transformers"} <= set(record["environment"]["versions"])
    assert "lm_eval" in record["environment"]["eval_versions"]
    metrics = record["metrics"]
    assert list(metrics) == ["forget_acc", "utility_acc", "forget_acc_cloze", "utility_acc_cloze", "verbmem_f",
                             "knowmem_f", "knowmem_r", "privleak_auc",
                             "privleak"]
    assert record["retrain_privleak_auc"] == metrics["privleak_auc"] and metrics["privleak"] == 0.0
    model, tokenizer = load_model(str(folder))
    toy = load_benchmark("toy")
    assert metrics["forget_acc"] == score_mc(model, tokenizer, toy.mc["forget"], max_samples=3).acc


def test_cli_lm_eval_backend_and_default_output(tiny, tmp_path, run_eval) -> None:
    _, _, folder = tiny
    args = ["--model", str(folder), "--benchmark", "toy", "--max-samples", "4", "--metric", "forget_acc"]
    result = run_eval(*args, "--backend", "lm-eval", "--out-dir", str(tmp_path), "--name", "tiny")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "eval-tiny" / "eval.json").read_text())
    printed = json.loads(result.output[result.output.index("{"): result.output.rindex("}") + 1])
    assert printed == written and written["config"]["backend"] == "lm-eval"
    ours = run_eval(*args, "--output", str(tmp_path / "ours.json"))
    assert ours.exit_code == 0, ours.output
    assert json.loads((tmp_path / "ours.json").read_text())["metrics"] == written["metrics"]


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "toyy"], "unknown benchmark 'toyy'; did you mean 'toy'?"),
    (["--benchmark", "toy", "--backend", "lmeval"], "backend: unknown value 'lmeval'. Allowed: ours, lm-eval"),
    (["--benchmark", "toy", "--metric", "privleak"], "privleak needs the retrained model's privleak AUC"),
    (["--benchmark", "toy", "--paths", "nonsense"], "paths: expected key=path, got 'nonsense'"),
    (["--benchmark", "toy", "--max-samples", "0"], "max_samples: expected a value > 0"),
])
def test_cli_bad_input(tiny, args: list[str], message: str, run_eval) -> None:
    result = run_eval("--model", str(tiny[2]), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
