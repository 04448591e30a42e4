"""MUSE's metrics against plain references: Min-K% Prob, the membership AUC and PrivLeak on hand-made
numbers, ROUGE-L against a longest-common-subsequence written here, batched greedy generation
against one prompt at a time, and VerbMem/KnowMem against MUSE's own per-prompt loop."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.eval import EvalError, available_metrics, default_metrics, evaluate
from unlearn.eval import muse as muse_module
from unlearn.eval.muse import (
    MuseDataError,
    cut_at_stops,
    greedy_generate,
    knowmem,
    knowmem_prompt,
    mia_auc,
    min_k_prob,
    privleak,
    privleak_auc,
    rouge_l,
    token_logprobs,
    verbmem,
)
from unlearn.models import smollm2_tokenizer


@pytest.fixture(scope="module")
def model64(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).double().eval()


PROMPTS = ["Alan Nettlestead works as a violinist. Alan was born and", "Bea", "Cy Hollow is employed by the",
           "In 1969, a child was born in Glenhallow; her name", "Dee likes teal."]


# ---- plain references -------------------------------------------------------------------------------

def lcs_rouge(reference: str, prediction: str) -> tuple[float, float, float]:
    """ROUGE-L by dynamic programming on rouge-score's tokens (lower case, runs of [a-z0-9])."""
    ref, pred = (re.findall(r"[a-z0-9]+", s.lower()) for s in (reference, prediction))
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, p in enumerate(pred):
            table[i + 1][j + 1] = table[i][j] + 1 if r == p else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0, 0.0, 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def muse_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """MUSE's loop body: one prompt, no padding, `generate`, decode the new tokens."""
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def pairwise_auc(negatives: list[float], positives: list[float]) -> float:
    """P(positive ranks above negative) + half the ties, over all pairs."""
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for n in negatives for p in positives]
    return sum(wins) / len(wins)


# ---- PrivLeak ------------------------------------------------------------------------------------

def test_min_k_prob_on_known_log_probs() -> None:
    logprobs = np.array([-1.0, -5.0, -3.0, -0.5, -2.0])
    assert min_k_prob(logprobs, 0.4) == pytest.approx(4.0)  # int(5 * 0.4) = 2 lowest: -5, -3
    assert min_k_prob(logprobs, 0.2) == pytest.approx(5.0)
    assert min_k_prob(logprobs, 1.0) == pytest.approx(2.3)
    assert min_k_prob(np.array([-7.0, -1.0]), 0.4) == pytest.approx(7.0)  # int(0.8) = 0: at least one token
    with pytest.raises(ValueError, match=r"k: expected a value in \[0.0, 1.0\]"):
        min_k_prob(logprobs, 1.5)


def test_mia_auc_against_pairwise_counting() -> None:
    forget, holdout = [0.5, 1.0, 2.0, 3.0], [1.0, 2.5, 4.0]  # Min-K values (higher = less likely)
    assert mia_auc(forget, holdout) == pytest.approx(pairwise_auc([-f for f in forget], [-h for h in holdout]))
    # a model that memorized the forget set: every forget text more likely than every holdout text
    assert mia_auc([0.1, 0.2], [3.0, 4.0]) == 0.0
    assert privleak(0.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.1, 0.5) == pytest.approx(-80.0)
    assert privleak(0.4772, 0.4772) == 0.0
    with pytest.raises(ValueError, match="retrain_auc: 0 leaves PrivLeak undefined"):
        privleak(0.3, 0.0)


def test_token_logprobs_batched_equal_one_text_at_a_time(tokenizer, model64) -> None:
    got = token_logprobs(model64, tokenizer, PROMPTS, batch_size=2)
    for text, lp in zip(PROMPTS, got):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            full = torch.log_softmax(model64(torch.tensor([ids])).logits[0], dim=-1)
        expected = full[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        np.testing.assert_allclose(lp, expected, rtol=0, atol=1e-10)


def test_privleak_auc_end_to_end(tokenizer, model64) -> None:
    forget, holdout = PROMPTS[:3], PROMPTS[3:]
    scores = [min_k_prob(lp) for lp in token_logprobs(model64, tokenizer, PROMPTS, batch_size=1)]
    expected = pairwise_auc([-s for s in scores[:3]], [-s for s in scores[3:]])
    assert privleak_auc(model64, tokenizer, forget, holdout, batch_size=4) == pytest.approx(expected)


def test_privleak_bad_input(tokenizer, model64) -> None:
    with pytest.raises(MuseDataError, match="forget and holdout splits must both be non-empty"):
        privleak_auc(model64, tokenizer, [], PROMPTS)
    with pytest.raises(MuseDataError, match=r"text 1 \('Hello'\) encodes to 1 token"):
        privleak_auc(model64, tokenizer, PROMPTS[:1] + ["Hello"], PROMPTS)


# ---- ROUGE, generation, VerbMem, KnowMem -----------------------------------------------------------

@pytest.mark.parametrize("reference, prediction", [
    ("The cat sat on the mat", "the cat lay on a mat"), ("Glenhallow", "Glenhallow, of course"),
    ("born in 1969", "1969"), ("a b c", "x y"), ("Don't stop", "don t stop!"),
])
def test_rouge_l_against_lcs(reference: str, prediction: str) -> None:
    assert rouge_l(reference, prediction) == pytest.approx(lcs_rouge(reference, prediction))


def test_knowmem_prompt_and_stops() -> None:
    prompt = knowmem_prompt("Where?", ["Who?", "When?"], ["Alan", "1969"])
    assert prompt == "Question: Who?\nAnswer: Alan\n\nQuestion: When?\nAnswer: 1969\n\nQuestion: Where?\nAnswer: "
    assert cut_at_stops("Paris\n\nQuestion: x") == "Paris"
    assert cut_at_stops("Rome\nQuestion: y") == "Rome"
    assert cut_at_stops("Oslo. Question: z") == "Oslo. "
    assert cut_at_stops("no stop here") == "no stop here"


def test_greedy_generate_batched_equals_one_prompt_at_a_time(tokenizer, model64) -> None:
    batched = greedy_generate(model64, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    alone = greedy_generate(model64, tokenizer, PROMPTS, max_new_tokens=10, batch_size=1)
    assert batched == alone and all(0 < len(ids) <= 10 for ids in batched)
    for prompt, ids in zip(PROMPTS, batched):
        assert tokenizer.decode(ids, skip_special_tokens=True) == muse_generate(model64, tokenizer, prompt, 10)


def test_generation_with_a_tokenizer_without_pad_token(tokenizer, model64) -> None:
    padless = smollm2_tokenizer()
    padless.pad_token = None
    assert greedy_generate(model64, padless, PROMPTS, max_new_tokens=6, batch_size=5) == greedy_generate(
        model64, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1)


def test_verbmem_as_muse_computes_it(tokenizer, model64) -> None:
    max_new = 8
    continuations = [muse_generate(model64, tokenizer, p, max_new) for p in PROMPTS]
    # truths: the model's own continuation (F1 = 1), with words added or changed, and unrelated text
    gts = [continuations[0], continuations[1] + " and more words after it", "unrelated words entirely",
           continuations[3].upper(), " ".join(continuations[4].split()[::-1])]
    result = verbmem(model64, tokenizer, PROMPTS, gts, max_new_tokens=max_new, batch_size=2)
    truths = [tokenizer.decode(tokenizer(gt).input_ids[:max_new], skip_special_tokens=True) for gt in gts]
    expected = [lcs_rouge(t, c)[2] for t, c in zip(truths, continuations)]
    assert result.outputs == continuations and result.references == truths
    np.testing.assert_allclose(result.scores, expected)
    assert result.scores[0] == 1.0 and 0 < result.mean < 1


def test_knowmem_as_muse_computes_it(tokenizer, model64) -> None:
    questions, icl_q, icl_a = ["Where did Alan grow up?", "Who employs Cy?", "When?"], ["Who?"], ["Bea"]
    raw = [muse_generate(model64, tokenizer, knowmem_prompt(q, icl_q, icl_a), 6) for q in questions]
    outputs = [re.split(r"\n\n|\nQuestion|Question:", r)[0] for r in raw]
    answers = [outputs[0], outputs[1] + " Bank", "Glenhallow"]
    result = knowmem(model64, tokenizer, questions, answers, icl_q, icl_a, max_new_tokens=6, batch_size=2)
    assert result.outputs == outputs
    # MUSE's knowmem_agg_key='mean_rougeL': the mean of rouge-score's fmeasure (F1), not of the recall
    f1 = [lcs_rouge(a, o)[2] for a, o in zip(answers, outputs)]
    recall = [lcs_rouge(a, o)[1] for a, o in zip(answers, outputs)]
    np.testing.assert_allclose(result.scores, f1)
    np.testing.assert_allclose(result.recalls, recall)
    assert result.mean == pytest.approx(np.mean(f1)) and result.mean_recall == pytest.approx(np.mean(recall))
    assert result.mean != pytest.approx(result.mean_recall)  # the answer with " Bank" added: F1 6/7, recall 3/4
    with pytest.raises(MuseDataError, match="knowmem: 1 in-context questions but 0 answers"):
        knowmem(model64, tokenizer, questions, answers, icl_q, [])


def test_generation_metrics_bad_input(tokenizer, model64) -> None:
    with pytest.raises(MuseDataError, match="verbmem: the split is empty"):
        verbmem(model64, tokenizer, [], [])
    with pytest.raises(MuseDataError, match="verbmem: 2 inputs but 1 references"):
        verbmem(model64, tokenizer, PROMPTS[:2], ["x"])
    with pytest.raises(ValueError, match="max_new_tokens: expected a value > 0"):
        greedy_generate(model64, tokenizer, PROMPTS, max_new_tokens=0)


# ---- evaluate() on the MUSE sections -------------------------------------------------------------

class Bench:
    def __init__(self, muse):
        self.name, self.mc, self.muse, self.corpora, self.models = "hand-made", {}, muse, {}, {}


def muse_bench() -> Bench:
    qa = Dataset.from_dict({"question": ["Where did Alan grow up?", "Who employs Cy?"],
                            "answer": ["Glenhallow", "Mossgate"]})
    icl = Dataset.from_dict({"question": ["Who?", "When?"], "answer": ["Bea", "1969"]})
    return Bench({
        "verbmem_forget": Dataset.from_dict({"prompt": PROMPTS[:3], "gt": ["a b", "c d", "e f"]}),
        "knowmem_forget_qa": qa, "knowmem_forget_qa_icl": icl, "knowmem_retain_qa": qa, "knowmem_retain_qa_icl": icl,
        "privleak_forget": Dataset.from_dict({"text": PROMPTS[:2]}),
        "privleak_holdout": Dataset.from_dict({"text": PROMPTS[3:]}),
    })


def test_evaluate_muse_metrics(tokenizer, model64) -> None:
    bench = muse_bench()
    assert default_metrics(bench) == ["verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"]
    assert available_metrics(bench, 0.4) == ["verbmem_f", "knowmem_f", "knowmem_r", "knowmem_f_recall",
                                             "knowmem_r_recall", "privleak_auc", "privleak"]
    got = evaluate(model64, tokenizer, bench, metrics=["knowmem_f", "privleak"], retrain_auc=0.4, max_samples=1)
    assert list(got) == ["knowmem_f", "privleak_auc", "privleak"]
    icl = bench.muse["knowmem_forget_qa_icl"]  # max_samples cuts the questions, never the examples
    assert got["knowmem_f"] == knowmem(model64, tokenizer, ["Where did Alan grow up?"], ["Glenhallow"],
                                       icl["question"], icl["answer"]).mean
    assert got["privleak_auc"] == privleak_auc(model64, tokenizer, PROMPTS[:1], PROMPTS[3:4])
    assert got["privleak"] == pytest.approx((got["privleak_auc"] - 0.4) / 0.4 * 100)


def test_knowmem_f1_and_recall_metrics_share_one_generation(tokenizer, model64, monkeypatch) -> None:
    """knowmem_f/_r are MUSE's mean ROUGE-L F1; knowmem_f_recall/_r_recall the mean recall of the same
    outputs, generated once per split. The answers are prefixes of the model's own outputs, so the
    recall is 1 where the F1 is well below it (the old recall-based knowmem_f would read 1.0 here)."""
    questions, icl_q, icl_a = ["Where did Alan grow up?", "Who employs Cy?"], ["Who?", "When?"], ["Bea", "1969"]
    outputs = knowmem(model64, tokenizer, questions, ["x", "x"], icl_q, icl_a).outputs
    answers = [" ".join(o.split()[:1]) for o in outputs]  # the first word of each output
    qa = Dataset.from_dict({"question": questions, "answer": answers})
    icl = Dataset.from_dict({"question": icl_q, "answer": icl_a})
    bench = Bench({"knowmem_forget_qa": qa, "knowmem_forget_qa_icl": icl,
                   "knowmem_retain_qa": qa.select([1]), "knowmem_retain_qa_icl": icl})
    calls = []
    original = muse_module.greedy_generate

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(muse_module, "greedy_generate", counting)
    got = evaluate(model64, tokenizer, bench, metrics=["knowmem_f_recall", "knowmem_f", "knowmem_r", "knowmem_r_recall"])
    assert calls == [2, 1]  # one generation per split, not one per metric
    assert list(got) == ["knowmem_f", "knowmem_r", "knowmem_f_recall", "knowmem_r_recall"]
    f1 = [lcs_rouge(a, o)[2] for a, o in zip(answers, outputs)]
    assert all(lcs_rouge(a, o)[1] == 1.0 for a, o in zip(answers, outputs)) and max(f1) < 0.5
    assert got["knowmem_f"] == pytest.approx(np.mean(f1)) and got["knowmem_r"] == pytest.approx(f1[1])
    assert got["knowmem_f_recall"] == 1.0 and got["knowmem_r_recall"] == 1.0


def test_evaluate_muse_bad_requests(tokenizer, model64) -> None:
    bench = muse_bench()
    with pytest.raises(EvalError, match="privleak needs the retrained model's privleak AUC"):
        evaluate(model64, tokenizer, bench, metrics=["privleak"])
    with pytest.raises(EvalError, match="hand-made: no mc split 'forget'; it has: none"):
        evaluate(model64, tokenizer, bench, metrics=["forget_acc"])
    with pytest.raises(ValueError, match="max_samples: expected a value > 0"):
        evaluate(model64, tokenizer, bench, max_samples=0)


def test_a_peft_model_generates_like_its_base(tokenizer, model64) -> None:
    from peft import LoraConfig, get_peft_model

    expected = greedy_generate(model64, tokenizer, PROMPTS, max_new_tokens=5)
    wrapped = get_peft_model(model64, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        assert greedy_generate(wrapped, tokenizer, PROMPTS, max_new_tokens=5) == expected
    finally:
        wrapped.unload()  # model64 is shared by the module's tests
