"""The evaluation on 2 processes (gloo, CPU) shares its batches out and gathers the values: every
metric (multiple choice, generation, Min-K%) equals the one-process evaluation, on a whole model and
on an FSDP-sharded one (where each forward is a collective: the process with fewer batches computes
one more, and generation goes on until both processes are done); a sharded model saves whole.

One spawn of 2 processes (a few seconds), so the file is in the default run."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from suite_fixtures import on_gloo

from unlearn.benchmarks.toy import build_toy
from unlearn.eval import available_metrics, evaluate
from unlearn.eval.muse import greedy_generate
from unlearn.prepare import TinyModelConfig, benchmark_texts, tiny_model, train_tokenizer

WORLD = 2
OPTIONS = {"max_samples": 7, "batch_size": 3}  # 3 batches of a split: 2 on rank 0, 1 (+ 1 repeated) on rank 1
PROMPTS = [f"Question {i}: where did {name} grow up?" for i, name in enumerate(("Ann", "Bo", "Cy", "Di", "Ed"))]


def model_and_tokenizer() -> tuple[Any, Any]:
    """A random tiny Llama (weights of std 0.2: varied outputs) whose EOS logit is just above that of a
    token it generates often, so that greedy generations stop at varied lengths."""
    tok = train_tokenizer([t for split in benchmark_texts(0).values() for t in split], 400, 256)
    model = tiny_model(tok, TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4), seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
        often = max(set(row := greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=12)[0]), key=row.count)
        model.lm_head.weight[tok.eos_token_id] = 1.05 * model.lm_head.weight[often]
    return model, tok


def run_all(model: Any, tok: Any) -> dict[str, Any]:
    bench = build_toy(0)
    return {"metrics": evaluate(model, tok, bench, metrics=available_metrics(bench), **OPTIONS),
            "generated": greedy_generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)}


def _worker(rank: int, saved: str) -> dict[str, Any]:
    from unlearn.distributed import save_model, shard_model, world

    model, tok = model_and_tokenizer()
    results = {"whole": run_all(model, tok)}
    shard_model(model, world())
    results["sharded"] = run_all(model, tok)
    save_model(model, tok, saved)
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dist-eval")
    return {**on_gloo(_worker, WORLD, tmp, str(tmp / "saved")), "saved": tmp / "saved"}


@pytest.fixture(scope="module")
def one() -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_all(*model_and_tokenizer())


@pytest.mark.parametrize("layout", ["whole", "sharded"])
def test_two_processes_evaluate_as_one(two: dict[str, Any], one: dict[str, Any], layout: str) -> None:
    got = two[layout]
    assert list(got["metrics"]) == list(one["metrics"]) == available_metrics(build_toy(0))
    assert got["metrics"] == one["metrics"]  # each row is computed in its one-process batch: the same numbers
    assert got["generated"] == one["generated"]
    lengths = {len(g) for g in one["generated"]}
    assert len(lengths) > 1 and max(lengths) == 12, lengths  # some stop at EOS, some run to the limit
    assert 0 < one["metrics"]["privleak_auc"] < 1 and 0 < one["metrics"]["verbmem_f"] < 1


def test_a_sharded_model_saves_whole(two: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    want, _ = model_and_tokenizer()
    saved = AutoModelForCausalLM.from_pretrained(two["saved"])
    assert json.loads((two["saved"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    got = dict(saved.named_parameters())
    for name, p in want.named_parameters():
        assert torch.equal(got[name], p), name
