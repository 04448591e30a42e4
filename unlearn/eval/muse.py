"""MUSE's metrics as MUSE computes them (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models"; swj0419/muse_bench `metrics/{verbmem,knowmem,privleak}.py`),
with the generation batched (left padding, KV cache) where MUSE generates one prompt at a time, and
the log-probs batched with right padding (see `unlearn.eval.mc` for why not left).

- VerbMem: greedy continuation of each prompt (128 new tokens), ROUGE-L F1 (rouge-score, no
  stemmer) against the truth cut to its first 128 tokens (MUSE encodes the truth with special
  tokens, cuts, and decodes without them), averaged: MUSE's `verbmem_agg_key='mean_rougeL'`, the
  mean of rouge-score's `fmeasure`. The prompts are the data's own (MUSE's verbmem split holds
  prompt/gt pairs already cut).
- KnowMem: the in-context examples as "Question: {q}\\nAnswer: {a}\\n\\n", then "Question: {q}\\nAnswer: ",
  32 greedy tokens, cut at the first "\\n\\n", "\\nQuestion" or "Question:", ROUGE-L F1 of the answer,
  averaged: MUSE's `knowmem_agg_key='mean_rougeL'` (its logger's `rougeL` is the `fmeasure`), as
  open-unlearning's MUSE port (`rouge_type: rougeL_f1`). The mean ROUGE-L recall (MUSE's logger
  also records it, as `mean_rougeL_recall`) comes from the same generations (`mean_recall`).
- PrivLeak: Min-K% Prob (Shi et al. 2024, k = 0.4: MUSE's "Min-40%") per text, the membership
  AUC of forget (label 0) vs holdout (label 1) on the score -Min-K (sklearn's ROC AUC, equal to
  MUSE's auc(roc_curve)), and privleak = (auc - auc_retrain) / auc_retrain * 100: about -100 for a
  model that memorized the forget set, 0 for one that behaves like the retrained model.

Scores are fractions in [0, 1] (MUSE's tables show them x 100); privleak is in percent, as MUSE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.validate import check_positive, check_range
from unlearn.distributed import world
from unlearn.eval.batching import (
    at_least_float32,
    eval_mode,
    gather_rows,
    is_sharded_model,
    left_pad,
    length_batches,
    model_device,
    pad_id,
    rank_batches,
)
from unlearn.eval.mc import model_max_length, right_pad

VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
MIN_K = 0.4
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


class MuseDataError(ValueError):
    """MUSE-format data that cannot be scored (empty split, mismatched lengths, a one-token text)."""


@cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, prediction: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of ROUGE-L, as MUSE's logger scores (gt, output)."""
    score = _scorer().score(reference, prediction)["rougeL"]
    return score.precision, score.recall, score.fmeasure


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set([eos] if isinstance(eos, int) else eos)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """MUSE's decoding, special tokens skipped. MUSE also asks for `clean_up_tokenization_spaces`, a
    no-op for the BPE tokenizers of causal LMs (they decode without the spaces it removes), which
    transformers 5 ignores with a warning for them; so it is left off."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """The new tokens of greedy decoding after each prompt (encoded with special tokens, as MUSE),
    up to and including the first EOS: what `generate` returns for the prompt alone. Batches of
    similar length are left-padded and decoded together with the KV cache."""
    check_positive("max_new_tokens", max_new_tokens)
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    eos, device, pad = _eos_ids(model, tokenizer), model_device(model), pad_id(tokenizer)
    out: dict[int, list[int]] = {}
    batches = rank_batches(length_batches([len(e) for e in encoded], batch_size), model)
    # on a sharded model every forward is a collective: a process whose rows are done goes on until all are
    synced = is_sharded_model(model) and world().size > 1
    with eval_mode(model):
        for batch, kept in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
            inputs = left_pad([encoded[i] for i in batch], pad, device)
            width = inputs["input_ids"].shape[1]
            generated = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, synced_gpus=synced,
            )
            for i, row in zip(batch if kept else (), generated[:, width:].tolist()):
                stop = next((j + 1 for j, token in enumerate(row) if token in eos), len(row))
                out[i] = row[:stop]
    gathered = gather_rows(out)
    return [gathered[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class GenerationScores:
    """Per-example outputs and their ROUGE-L (precision, recall, F1) against the references. The
    metric is the mean F1 (`mean`, MUSE's `mean_rougeL`); `mean_recall` is MUSE's `mean_rougeL_recall`."""

    outputs: list[str]
    references: list[str]
    rouge: np.ndarray  # (N, 3): precision, recall, F1 of each example

    @classmethod
    def score(cls, outputs: list[str], references: list[str]) -> GenerationScores:
        return cls(outputs, references, np.array([rouge_l(r, o) for r, o in zip(references, outputs)]).reshape(-1, 3))

    @property
    def scores(self) -> np.ndarray:
        """Per-example ROUGE-L F1 (what `mean` averages)."""
        return self.rouge[:, 2]

    @property
    def recalls(self) -> np.ndarray:
        return self.rouge[:, 1]

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    @property
    def mean_recall(self) -> float:
        return float(self.recalls.mean())


def _check_pairs(name: str, inputs: Sequence[str], references: Sequence[str]) -> None:
    if len(inputs) == 0:
        raise MuseDataError(f"{name}: the split is empty")
    if len(inputs) != len(references):
        raise MuseDataError(f"{name}: {len(inputs)} inputs but {len(references)} references")


def verbmem(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    gts: Sequence[str],
    *,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: bool = False,
) -> GenerationScores:
    """VerbMem: ROUGE-L F1 of the greedy continuation against the first `max_new_tokens` tokens of the truth."""
    _check_pairs("verbmem", prompts, gts)
    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress)
    outputs = [decode(tokenizer, ids) for ids in generated]
    encoded_truths = tokenizer(list(gts), add_special_tokens=True)["input_ids"]
    truths = [decode(tokenizer, ids[:max_new_tokens]) for ids in encoded_truths]
    return GenerationScores.score(outputs, truths)


def knowmem_prompt(question: str, icl_questions: Sequence[str], icl_answers: Sequence[str]) -> str:
    """MUSE's few-shot QA prompt (note the space after the last "Answer:", as in MUSE)."""
    examples = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in zip(icl_questions, icl_answers))
    return examples + f"Question: {question}\nAnswer: "


def cut_at_stops(text: str, stops: Sequence[str] = KNOWMEM_STOPS) -> str:
    """The text before the first occurrence of each stop string, applied in turn (MUSE's
    `get_prefix_before_words_occur`)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def knowmem(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    icl_questions: Sequence[str] = (),
    icl_answers: Sequence[str] = (),
    *,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: bool = False,
) -> GenerationScores:
    """KnowMem: ROUGE-L of the few-shot greedy answer against the true answer; `.mean` is the metric
    (mean F1, as MUSE), `.mean_recall` the mean recall."""
    _check_pairs("knowmem", questions, answers)
    if len(icl_questions) != len(icl_answers):
        raise MuseDataError(f"knowmem: {len(icl_questions)} in-context questions but {len(icl_answers)} answers")
    prompts = [knowmem_prompt(q, icl_questions, icl_answers) for q in questions]
    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress)
    outputs = [cut_at_stops(decode(tokenizer, ids)) for ids in generated]
    return GenerationScores.score(outputs, list(answers))


def token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[np.ndarray]:
    """log p(x_t | x_<t) of every token after the first, for each text encoded with special tokens
    (MUSE's `compute_ppl`), cut to the model's maximum length (MUSE does not cut; its texts fit).
    Batches are right-padded, so that every row computes what it computes alone (see `unlearn.eval.mc`)."""
    max_length = model_max_length(model.config, tokenizer)
    encoded = [ids[:max_length] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise MuseDataError(f"privleak: text {i} ({texts[i][:40]!r}) encodes to {len(ids)} token(s); "
                                "need 2 or more")
    device, pad = model_device(model), pad_id(tokenizer)
    out: dict[int, np.ndarray] = {}
    batches = rank_batches(length_batches([len(e) for e in encoded], batch_size), model)
    with eval_mode(model):
        for batch, kept in tqdm(batches, desc="log-probs", unit="batch", disable=not progress, leave=False):
            inputs = right_pad([encoded[i] for i in batch], pad, device)
            logits = at_least_float32(model(**inputs).logits[:, :-1])
            targets = inputs["input_ids"][:, 1:]
            logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            for b, i in enumerate(batch if kept else ()):  # row b's real tokens are its first len(encoded[i]) columns
                out[i] = logprobs[b, : len(encoded[i]) - 1].double().cpu().numpy()
    gathered = gather_rows(out)
    return [gathered[i] for i in range(len(texts))]


def min_k_prob(logprobs: np.ndarray, k: float = MIN_K) -> float:
    """MUSE's "Min-{k}%" value: minus the mean of the int(n * k) lowest token log-probs (at least one
    token, where MUSE would take the mean of nothing). Higher = less likely = more "unseen"."""
    check_range("k", k, 0.0, 1.0)
    count = max(1, int(len(logprobs) * k))
    return float(-np.mean(np.sort(logprobs)[:count]))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's AUC "forget_holdout": forget texts labelled 0, holdout texts 1, ranked by -score."""
    if len(forget_scores) == 0 or len(holdout_scores) == 0:
        raise MuseDataError("privleak: the forget and holdout splits must both be non-empty")
    labels = np.r_[np.zeros(len(forget_scores)), np.ones(len(holdout_scores))]
    return float(roc_auc_score(labels, -np.r_[np.asarray(forget_scores, float), np.asarray(holdout_scores, float)]))


def privleak_auc(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    forget: Sequence[str],
    holdout: Sequence[str],
    *,
    k: float = MIN_K,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """Min-K% Prob membership AUC of forget vs holdout (about 0 when the forget set is memorized, 0.5 when not)."""
    scores = [min_k_prob(lp, k) for lp in token_logprobs(model, tokenizer, [*forget, *holdout],
                                                         batch_size=batch_size, progress=progress)]
    return mia_auc(scores[: len(forget)], scores[len(forget) :])


def privleak(auc: float, retrain_auc: float) -> float:
    """MUSE's PrivLeak in percent: (auc - retrain_auc) / retrain_auc * 100."""
    check_range("retrain_auc", retrain_auc, 0.0, 1.0)
    if retrain_auc == 0:
        raise ValueError("retrain_auc: 0 leaves PrivLeak undefined (it divides by the retrained model's AUC)")
    return (auc - retrain_auc) / retrain_auc * 100.0
