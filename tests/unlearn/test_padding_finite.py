"""Token log-probs of padded batches equal those of each row scored alone, without padding, and are
finite, for float32 and float64 models with eager and SDPA attention. A float64 model with eager
attention gives NaN at a left-padded row's padding positions (they attend to nothing: transformers'
float64 mask becomes -inf in its float32 softmax), and the next layer spreads the NaN into the row's
real positions; multiplying by a 0 mask does not remove it either (NaN * 0 = NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_fixtures import FORGET, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.data import IGNORE, LMBatch, tokenize_texts
from unlearn.eval.mc import encode_pairs, loglikelihoods
from unlearn.eval.muse import token_logprobs as muse_token_logprobs
from unlearn.objectives.base import sequence_logprob, token_logprobs
from unlearn.objectives.rmu import masked_mse

TEXTS = ["Alan Nettlestead works as a violinist. Alan was born and", "Bea", "Cy Hollow is employed by the",
         "In 1969, a child was born in Glenhallow; her name", "Dee likes teal."]
# eager attention takes its softmax in float32 even in a float64 model: float32-level agreement there
CASES = [(torch.float32, "eager", 1e-5), (torch.float32, "sdpa", 1e-5),
         (torch.float64, "eager", 1e-6), (torch.float64, "sdpa", 1e-10)]
IDS = [f"{str(d).split('.')[-1]}-{a}" for d, a, _ in CASES]


def tiny(vocab_size: int, dtype: torch.dtype, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).to(dtype).eval()
    assert model.config._attn_implementation == attn
    return model


def alone(model, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t), t >= 1, of one unpadded row, in float64."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_left_padding_in_float64_eager_gives_nan_in_the_model_itself(tokenizer) -> None:
    """The failure these scorers avoid: not ours, the model's; so left padding must not reach it."""
    model = tiny(len(tokenizer), torch.float64, "eager")
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isnan(logits[0]).all(-1).all()  # padding and real positions alike, after 2+ layers
    assert torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("dtype, attn, tol", CASES, ids=IDS)
def test_muse_token_logprobs_batched_equal_alone(tokenizer, dtype, attn, tol) -> None:
    model = tiny(len(tokenizer), dtype, attn)
    got = muse_token_logprobs(model, tokenizer, TEXTS, batch_size=5)
    for text, lp in zip(TEXTS, got):
        assert np.isfinite(lp).all()
        np.testing.assert_allclose(lp, alone(model, tokenizer(text)["input_ids"]).numpy(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype, attn, tol", CASES, ids=IDS)
def test_mc_loglikelihoods_batched_equal_alone(tokenizer, dtype, attn, tol) -> None:
    model = tiny(len(tokenizer), dtype, attn)
    # multi-token continuations of different lengths after contexts of different lengths: one row each
    choices = [" Glenhallow", " Mossgate Bank", " teal", " 1969, in spring"]
    requests = [encode_pairs(tokenizer, [(text, choice) for choice in choices]) for text in TEXTS]
    got = loglikelihoods(model, tokenizer, requests, batch_size=8)
    assert np.isfinite(got).all()
    for q, pairs in enumerate(requests):
        for c, (context, continuation) in enumerate(pairs):
            lp = alone(model, context + continuation)
            assert got[q, c] == pytest.approx(float(lp[-len(continuation):].sum()), abs=tol)


def left_padded(data: dict[str, torch.Tensor], rows: list[int]) -> LMBatch:
    """The rows of right-padded `data` with their padding moved to the left."""
    ids, mask, labels = (data[k][rows].clone() for k in ("input_ids", "attention_mask", "labels"))
    for b in range(len(rows)):
        n = int(mask[b].sum())
        for t in (ids, mask, labels):
            t[b] = torch.roll(t[b], ids.shape[1] - n)
    return LMBatch(ids, mask, labels, torch.tensor(rows), token_norm=float((labels[:, 1:] != IGNORE).sum()),
                   position_norm=float(mask.sum()), seq_norm=float(len(rows)))


@pytest.mark.parametrize("dtype, attn, tol", CASES, ids=IDS)
def test_objective_logprobs_of_a_left_padded_batch_equal_alone(dtype, attn, tol) -> None:
    tok = tiny_tokenizer()
    model = tiny(len(tok), dtype, attn)
    data = tokenize_texts(tok, FORGET, 64)
    rows = [4, 0, 5, 1]
    batch = left_padded(data, rows)
    assert (batch.attention_mask[:, 0] == 0).any()  # some rows are left-padded
    logprobs = token_logprobs(model, batch)
    assert torch.isfinite(logprobs).all()
    for b, i in enumerate(rows):
        expected = alone(model, tok(FORGET[i])["input_ids"])
        n = len(expected)
        torch.testing.assert_close(logprobs[b, -n:].double(), expected, rtol=0, atol=tol)
        assert (logprobs[b, :-n] == 0).all()  # the padding columns, selected out
    torch.testing.assert_close(sequence_logprob(model, batch).double(),
                               torch.stack([alone(model, tok(FORGET[i])["input_ids"]).sum() for i in rows]),
                               rtol=0, atol=10 * tol)
    # the gradient is finite and the same as that of the right-padded batch
    (-sequence_logprob(model, batch).sum()).backward()
    left = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    right = LMBatch(*(data[k][rows] for k in ("input_ids", "attention_mask", "labels")), torch.tensor(rows),
                    batch.token_norm, batch.position_norm, batch.seq_norm)
    (-sequence_logprob(model, right).sum()).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(left[name]).all(), name
        torch.testing.assert_close(left[name], p.grad, rtol=100 * tol, atol=10 * tol, msg=name)


def test_rmu_mse_selects_padding_out_rather_than_multiplying_it() -> None:
    h = torch.ones(2, 3, 4, dtype=torch.float64)
    h[0, 0] = float("nan")  # a padding position
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    batch = LMBatch(torch.zeros(2, 3, dtype=torch.long), mask, torch.zeros(2, 3, dtype=torch.long),
                    torch.arange(2), token_norm=3.0, position_norm=5.0, seq_norm=2.0)
    loss = masked_mse(h, torch.zeros(4, dtype=torch.float64), batch)
    assert loss.item() == pytest.approx(1.0)  # 5 positions of squared norm 4, over 5 * 4
