"""The relearning attack: seeded draws without replacement, mean/std against a float64 reference,
every draw starting from the unlearned weights (checked against the training loop run by hand on
the same samples), the start evaluated once, the caller's model given back unchanged, resume per draw,
and bad settings."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from train_fixtures import FORGET, RETAIN, params_of, tiny_llama, tiny_tokenizer

from shared.config import ConfigError
from unlearn.data import collate, tokenize_texts
from unlearn.objectives import token_logprobs
from unlearn.relearn import RelearnConfig, curve_stats, draw_samples, mean_std, relearn
from unlearn.train import unlearn

POOL = FORGET + RETAIN  # 12 texts


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def nll_eval(tok, texts):
    """eval_fn: mean token NLL of `texts` (drops as the model relearns them) and a weight fingerprint."""
    data = tokenize_texts(tok, texts, 64)

    def eval_fn(model, step):
        with torch.no_grad():
            batch = collate(data, range(len(texts)))
            nll = -token_logprobs(model, batch).sum().item() / batch.predicted.sum().item()
            weights = sum(p.double().sum().item() for p in model.parameters())
        return {"nll": nll, "weights": weights}

    return eval_fn


def config(**kw) -> RelearnConfig:
    settings = {"n_samples": 4, "draws": 2, "lr": 1e-2, "steps": 4, "batch_size": 2, "max_length": 64,
                "eval_every": 2, "seed": 3}
    return RelearnConfig(**{**settings, **kw})


def test_draws_are_seeded_without_replacement_and_differ():
    a = draw_samples(12, 5, seed=0, draw=0)
    assert a == draw_samples(12, 5, seed=0, draw=0)
    assert len(set(a)) == 5 and all(0 <= i < 12 for i in a)
    assert a != draw_samples(12, 5, seed=0, draw=1) and a != draw_samples(12, 5, seed=1, draw=0)
    assert sorted(draw_samples(12, 12, seed=0, draw=0)) == list(range(12))
    assert draw_samples(12, None, seed=0, draw=1) == list(range(12))  # None: the whole forget set
    with pytest.raises(ConfigError, match="n_samples: 13 is more than the 12 texts"):
        draw_samples(12, 13, seed=0, draw=0)


def test_mean_std_and_curve_stats_match_a_float64_reference():
    curves = [[{"step": 0, "acc": 0.5}, {"step": 5, "acc": 0.75}],
              [{"step": 0, "acc": 0.25}, {"step": 5, "acc": 0.5}],
              [{"step": 0, "acc": 0.3}, {"step": 5, "acc": 1.0}]]
    rows = curve_stats(curves)
    for i, step in enumerate((0, 5)):
        values = [c[i]["acc"] for c in curves]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample standard deviation
        assert rows[i] == {"step": step, "acc": pytest.approx(mean, abs=1e-15), "acc_std": pytest.approx(std, abs=1e-15)}
    assert mean_std([0.4]) == (0.4, None)
    assert curve_stats(curves[:1])[1] == {"step": 5, "acc": 0.75, "acc_std": None}
    with pytest.raises(ValueError, match="different steps"):
        curve_stats([curves[0], [{"step": 0, "acc": 0.1}, {"step": 4, "acc": 0.2}]])


def test_each_draw_starts_from_the_unlearned_weights_and_the_model_comes_back(tok):
    model = tiny_llama(tok)
    before = params_of(model)
    cfg = config()
    result = relearn(model, tok, POOL, cfg, eval_fn=nll_eval(tok, POOL))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # given back unchanged

    assert [d["draw"] for d in result["draws"]] == [0, 1]
    for draw in result["draws"]:
        # reference: the training loop by hand, from a copy of the initial model, on the same samples
        samples = draw_samples(len(POOL), cfg.n_samples, cfg.seed, draw["draw"])
        assert draw["samples"] == samples
        reference = copy.deepcopy(model)
        summary = unlearn(reference, tok, [POOL[i] for i in samples], None, cfg.train_config(draw["draw"]),
                          eval_fn=nll_eval(tok, POOL))
        expected = [{k: v for k, v in r.items() if k != "kind"} for r in summary["evals"]]
        assert draw["curve"] == expected
        assert [r["step"] for r in draw["curve"]] == [0, 2, 4]
        assert draw["curve"][-1]["nll"] < draw["curve"][0]["nll"]  # it relearned
    assert result["draws"][0]["curve"][0] == result["draws"][1]["curve"][0]  # same start
    assert result["draws"][0]["curve"][-1] != result["draws"][1]["curve"][-1]  # other samples, other end

    for i, row in enumerate(result["curve"]):
        values = np.array([d["curve"][i]["nll"] for d in result["draws"]])
        assert row["nll"] == pytest.approx(values.mean(), abs=1e-12)
        assert row["nll_std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert result["final"] == {k: v for k, v in result["curve"][-1].items() if k != "step"}


def test_the_lora_attack_leaves_the_unlearned_weights_untouched_between_draws(tok):
    """The fine-tuning attack of Lucki et al. 2024 (LoRA on every projection): each draw merges its
    adapters into the model, and the next draw starts from the unlearned weights again."""
    model = tiny_llama(tok)
    before = params_of(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = config(lr=1e-2, options={"lora": True, "lora_r": 8, "lora_alpha": 16.0, "lora_targets": targets})
    result = relearn(model, tok, POOL, cfg, eval_fn=nll_eval(tok, POOL))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    unlearned = nll_eval(tok, POOL)(model, 0)["nll"]
    # the adapters start at B = 0 on the unlearned weights: the unlearned model's output
    assert result["draws"][0]["curve"][0]["nll"] == pytest.approx(unlearned, abs=1e-12)
    for draw in result["draws"]:
        assert draw["curve"][-1]["nll"] < draw["curve"][0]["nll"]  # the adapters relearned
    # the second draw is the one a fresh copy of the unlearned model gives
    samples = draw_samples(len(POOL), cfg.n_samples, cfg.seed, 1)
    summary = unlearn(copy.deepcopy(model), tok, [POOL[i] for i in samples], None, cfg.train_config(1),
                      eval_fn=nll_eval(tok, POOL))
    assert result["draws"][1]["curve"][1:] == [{k: v for k, v in r.items() if k != "kind"} for r in summary["evals"]][1:]


def test_the_start_is_evaluated_once_or_taken_as_given(tok):
    """Every draw starts from the same weights: step 0 is evaluated for the first draw only, and not at all
    when its values are given (the unit's evaluation after unlearning)."""
    calls = []

    def counting(model, step):
        calls.append(step)
        return {"v": float(step)}

    first = relearn(tiny_llama(tok), tok, POOL, config(), eval_fn=counting)
    assert calls == [0, 2, 4, 2, 4] and first["draws"][1]["curve"][0] == {"step": 0, "v": 0.0}
    calls.clear()
    given = relearn(tiny_llama(tok), tok, POOL, config(), eval_fn=counting, initial={"v": -1.0})
    assert calls == [2, 4, 2, 4] and [d["curve"][0] for d in given["draws"]] == [{"step": 0, "v": -1.0}] * 2


def test_finished_draws_are_not_run_again(tok, tmp_path):
    model = tiny_llama(tok)
    cfg = config(draws=1, steps=2)
    first = relearn(model, tok, POOL, cfg, eval_fn=nll_eval(tok, POOL), run_dir=tmp_path)
    assert (tmp_path / "relearn.json").is_file() and (tmp_path / "draw0" / "metrics.jsonl").is_file()
    assert not list((tmp_path / "draw0").glob("checkpoint.*"))  # the draw's weights are not kept

    calls = []
    second = relearn(model, tok, POOL, cfg, eval_fn=lambda m, s: calls.append(s) or {}, run_dir=tmp_path)
    assert calls == [] and second["curve"] == first["curve"]
    third = relearn(model, tok, POOL, config(draws=1, steps=2, lr=5e-3), eval_fn=nll_eval(tok, POOL), run_dir=tmp_path)
    assert third["curve"] != first["curve"]  # other settings: run again
    relearn(model, tok, POOL, cfg, eval_fn=lambda m, s: calls.append(s) or {"nll": 0.0}, run_dir=tmp_path, resume=False)
    assert calls == [0, 2]


def test_bad_settings_fail_before_any_training(tok):
    with pytest.raises(ConfigError, match="options.lr: set by the relearning attack"):
        RelearnConfig(options={"lr": 1e-3})
    with pytest.raises(ConfigError, match="options.bogus: unknown key"):
        RelearnConfig(options={"bogus": 1})
    with pytest.raises(ConfigError, match="n_samples: expected an integer >= 1"):
        RelearnConfig(n_samples=0)
    with pytest.raises(ConfigError, match="lr: expected a value > 0"):
        RelearnConfig(lr=0.0)
    calls = []
    with pytest.raises(ConfigError, match="n_samples: 20 is more than the 12 texts"):
        relearn(tiny_llama(tok), tok, POOL, config(n_samples=20), eval_fn=lambda m, s: calls.append(s) or {})
    with pytest.raises(ValueError, match="forget_pool: expected at least one"):
        relearn(tiny_llama(tok), tok, [], config())
    assert calls == []


def test_options_reach_the_fine_tuning():
    cfg = config(options={"weight_decay": 0.1, "schedule": "cosine"})
    train = cfg.train_config(1)
    assert (train.objective, train.smoother, train.weight_decay, train.schedule) == ("nll", "none", 0.1, "cosine")
    assert (train.lr, train.steps, train.batch_size, train.eval_every) == (1e-2, 4, 2, 2)
    assert train.seed != cfg.train_config(0).seed  # each draw its own data order
