"""The one training loop: every bad input fails before training; accumulation, resume and seeds
repeat runs exactly; a NaN or exploding loss stops the run keeping the last good checkpoint; LoRA,
RMU's layer selection, weight averaging, the eval hook and the run folder do what they claim."""

from __future__ import annotations

import json
import math

import pytest
import torch
from suite_fixtures import kill_everywhere, strip
from train_fixtures import FORGET, RETAIN, params_of, tiny_llama, tiny_tokenizer

from shared.config import ConfigError, from_dict
from shared.runio import RunDir
from unlearn.train import TrainingDiverged, UnlearnConfig, unlearn


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def config(**kw) -> UnlearnConfig:
    base = {"objective": "npo", "smoother": "sam", "steps": 3, "lr": 1e-2, "batch_size": 2, "rho": 0.05}
    return UnlearnConfig(**{**base, **kw})


def run(tok, cfg, *, seed=0, dtype=torch.float64, **kw):
    model = tiny_llama(tok, seed=seed, dtype=dtype)
    summary = unlearn(model, tok, FORGET, RETAIN, cfg, **kw)
    return model, summary


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


# ----------------------------------------------------------------------------- bad input, before training
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"objective": "np0"}, "objective: unknown objective 'np0'; did you mean 'npo'"),
        ({"smoother": "samm"}, "smoother: unknown smoother 'samm'; did you mean 'sam'"),
        ({"base_optimizer": "adamx"}, "base_optimizer: unknown base optimizer 'adamx'"),
        ({"rho": 0.0}, "rho: expected a value > 0, got 0.0"),
        ({"rho": -0.1}, "rho: expected a value > 0, got -0.1"),
        ({"grad_accum": 0}, "grad_accum: expected an integer >= 1"),
        ({"steps": 0}, "steps: expected an integer >= 1"),
        ({"sam_options": {"alpha": 0.1}, "smoother": "rs"}, "sam_options: only used by the smoothers sam, asam, gsam"),
        ({"smoother": "asam", "sam_options": {"alpha": 0.1}},
         r"sam_options.alpha: unknown option of ASAM over AdamW. Allowed: .*\beta\b"),
        ({"smoother": "gsam", "sam_options": {"alpha": -1.0}}, r"sam_options.alpha: expected a value"),
        ({"lr": float("inf")}, r"lr: expected a value > 0|lr: expected a finite"),
    ],
)
def test_bad_config_names_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


def test_config_from_yaml_values_is_checked_too():
    with pytest.raises(ConfigError, match="rho: expected a number"):
        from_dict(UnlearnConfig, {"rho": "big"})
    assert from_dict(UnlearnConfig, {"smoother": "gsam", "sam_options": {"alpha": 0.2}}).sam_options == {"alpha": 0.2}


@pytest.mark.parametrize(
    ("forget", "retain", "kw", "message"),
    [
        ([], RETAIN, {}, "forget: expected at least one text, got an empty forget set"),
        (FORGET, None, {"objective": "graddiff"}, "retain: objective 'graddiff' with gamma=1.0 needs a retain set"),
        (FORGET, [], {"objective": "npo"}, "retain: objective 'npo' with gamma=1.0 needs a retain set, got an empty"),
        (FORGET, None, {"objective": "rmu", "rmu_layer": 0, "rmu_update_layers": [0]}, "retain: objective 'rmu'"),
        (FORGET, RETAIN, {"lora": True, "lora_targets": ["q_proj", "qkv_proj"]},
         "lora_targets: the model has no module 'qkv_proj'; its linear modules are: down_proj, gate_proj, k_proj"),
        (FORGET, RETAIN, {"smoother": "wa", "wa_start": 10}, "wa_start: 10 is after the last step"),
        (FORGET, RETAIN, {"objective": "rmu", "rmu_layer": 5}, "rmu_layer: layer 5 does not exist"),
    ],
)
def test_bad_input_fails_before_training(tok, tmp_path, forget, retain, kw, message):
    model = tiny_llama(tok)
    before = params_of(model)
    with pytest.raises(ValueError, match=message):
        unlearn(model, tok, forget, retain, config(**kw), run_dir=tmp_path / "run")
    assert same(params_of(model), before)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert all(p.requires_grad for p in model.parameters())


def test_npo_without_retain_term_needs_no_retain_set(tok):
    _, summary = run(tok, config(gamma=0.0), dtype=torch.float32)
    assert "retain_loss" not in summary["final"] and summary["steps"] == 3


# ----------------------------------------------------------------------------- exactness and reproducibility
def test_two_micro_batches_equal_one_batch(tok):
    """batch 4 x 1 micro-batch vs batch 2 x 2 micro-batches: the same rows and the same updates
    (each smoother's own accumulation is checked against a reference in test_smoothers.py)."""
    cfg = {"base_optimizer": "sgd", "lr": 0.05, "max_grad_norm": None, "smoother": "sam"}
    one, _ = run(tok, config(batch_size=4, grad_accum=1, **cfg))
    two, _ = run(tok, config(batch_size=2, grad_accum=2, **cfg))
    assert same(params_of(one), params_of(two), atol=1e-6)
    assert not same(params_of(one), params_of(tiny_llama(tok)), atol=1e-3)  # it did train


def test_seeded_runs_repeat_and_seeds_differ(tok):
    cfg = {"objective": "graddiff", "smoother": "rs", "sigma": 1e-3, "rs_samples": 2, "steps": 2}
    a, _ = run(tok, config(**cfg), dtype=torch.float32)
    b, _ = run(tok, config(**cfg), dtype=torch.float32)
    c, _ = run(tok, config(seed=1, **cfg), dtype=torch.float32)
    assert same(params_of(a), params_of(b))
    assert not same(params_of(a), params_of(c), atol=1e-6)


def test_resume_after_a_kill_repeats_the_uninterrupted_run(tok, tmp_path):
    cfg = config(objective="simnpo", smoother="sam", steps=4, save_every=2, eval_every=1)
    full, _ = run(tok, cfg, run_dir=tmp_path / "full", eval_fn=lambda m, s: {"s": s})

    def killed_at_3(model, step):
        if step == 3:
            raise KeyboardInterrupt
        return {"s": step}

    model = tiny_llama(tok)
    with pytest.raises(KeyboardInterrupt):
        unlearn(model, tok, FORGET, RETAIN, cfg, run_dir=tmp_path / "part", eval_fn=killed_at_3)
    assert all(p.requires_grad for p in model.parameters())
    resumed, summary = run(tok, cfg, run_dir=tmp_path / "part", eval_fn=lambda m, s: {"s": s})
    assert summary["resumed_from"] == 2
    assert same(params_of(resumed), params_of(full))
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    expected = [(0, "eval")] + [(s, k) for s in range(1, 5) for k in ("train", "eval")]
    assert [(r["step"], r["kind"]) for r in lines] == expected
    with pytest.raises(ConfigError, match="another config or other data"):
        unlearn(tiny_llama(tok), tok, FORGET[:3], RETAIN, cfg, run_dir=tmp_path / "part")
    # a caller that owns the folder (the pipeline, after a setting changed) replaces the stale run
    other, fresh = tiny_llama(tok), tiny_llama(tok)
    restarted = unlearn(other, tok, FORGET[:3], RETAIN, cfg, run_dir=tmp_path / "part", replace_stale=True)
    unlearn(fresh, tok, FORGET[:3], RETAIN, cfg)
    assert restarted["resumed_from"] == 0 and same(params_of(other), params_of(fresh))
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]  # the stale records are gone


# ----------------------------------------------------------------------------- divergence
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tok, tmp_path):
    def poison_after_step_3(model, step):
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return {}

    model = tiny_llama(tok)
    with pytest.raises(TrainingDiverged, match=r"step 4: the loss diverged \(loss nan.*last good checkpoint is .*"
                       r"checkpoint.safetensors \(step 2\)") as err:
        unlearn(model, tok, FORGET, RETAIN, config(steps=6, save_every=2, eval_every=1), run_dir=tmp_path,
                eval_fn=poison_after_step_3)
    assert err.value.step == 4
    from shared.checkpoint import load_checkpoint

    saved = load_checkpoint(err.value.checkpoint)
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["trainable"].values())


def test_exploding_loss_stops_the_run(tok):
    with pytest.raises(TrainingDiverged, match="step 1: .*max_loss=5.*no checkpoint was saved"):
        run(tok, config(objective="npo", max_loss=5.0))  # NPO starts at (2/beta) log 2 = 13.9


# ----------------------------------------------------------------------------- what is trained
def test_lora_trains_adapters_and_merges_them_into_the_callers_model(tok):
    model = tiny_llama(tok, dtype=torch.float32)
    before = params_of(model)
    cfg = config(objective="graddiff", smoother="none", lora=True, lora_targets=["v_proj"], lr=0.05)
    unlearn(model, tok, FORGET, RETAIN, cfg)
    after = params_of(model)
    assert set(after) == set(before)  # no LoRA module left behind
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"model.layers.{i}.self_attn.v_proj.weight" for i in (0, 1)}
    assert all(p.requires_grad for p in model.parameters())


def test_rmu_updates_only_its_layers_and_restores_requires_grad(tok):
    model = tiny_llama(tok, dtype=torch.float32)
    before = params_of(model)
    summary = unlearn(model, tok, FORGET, RETAIN, config(objective="rmu", smoother="none", rmu_layer=1,
                                                         rmu_update_layers=[0], gamma=10.0))
    changed = {n for n, p in params_of(model).items() if not torch.equal(before[n], p)}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}
    assert summary["trainable_params"] == 64 * 32
    assert all(p.requires_grad for p in model.parameters())


def test_weight_averaging_returns_the_mean_of_the_averaged_steps(tok):
    weights = []
    plain = config(objective="ga", smoother="none", steps=4, eval_every=1, base_optimizer="sgd")
    run(tok, plain, eval_fn=lambda m, s: weights.append(params_of(m)) or {})
    averaged, _ = run(tok, config(objective="ga", smoother="wa", steps=4, base_optimizer="sgd", wa_start=2, wa_every=2))
    expected = {n: (weights[2][n] + weights[4][n]) / 2 for n in weights[0]}  # weights[s]: after step s
    assert same(params_of(averaged), expected, atol=1e-12)


# ----------------------------------------------------------------------------- the run folder and the hook
def test_run_folder_metrics_eval_hook_and_schedule(tok, tmp_path):
    calls = []
    cfg = config(objective="graddiff", smoother="none", steps=6, eval_every=4, schedule="cosine", warmup_steps=2,
                 base_optimizer="adamw", lr=1e-3)
    _, summary = run(tok, cfg, run_dir=tmp_path, eval_fn=lambda m, s: calls.append((s, m.training)) or {"acc": s / 10})
    assert calls == [(0, False), (4, False), (6, False)]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"forget_loss", "retain_loss", "loss", "lr", "grad_norm", "epoch"} <= set(train[0])
    assert train[0]["loss"] == pytest.approx(train[0]["forget_loss"] + train[0]["retain_loss"])
    warm = [1e-3 * s / 2 for s in range(2)]  # transformers' linear warmup from 0, then cosine to 0 at step 6
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert [r["lr"] for r in train] == pytest.approx(warm + cosine, abs=1e-15)
    assert [e["acc"] for e in summary["evals"]] == [0.0, 0.4, 0.6]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoint.safetensors").exists()


def test_bf16_autocast_and_gradient_checkpointing_run(tok):
    model = tiny_llama(tok, dtype=torch.float32)
    reference = tiny_llama(tok, dtype=torch.float32)
    cfg = {"objective": "npo", "smoother": "none", "steps": 2, "base_optimizer": "sgd", "lr": 0.05}
    unlearn(reference, tok, FORGET, RETAIN, config(**cfg))
    unlearn(model, tok, FORGET, RETAIN, config(gradient_checkpointing=True, **cfg))
    assert same(params_of(model), params_of(reference), atol=1e-6)  # recomputation changes nothing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    _, summary = run(tok, config(bf16=True, **cfg), dtype=torch.float32)
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final"].values())


def test_the_loop_survives_a_kill_at_every_write(tok, tmp_path, monkeypatch):
    """Killed before, inside or after any write of its run folder, a resumed run is the uninterrupted one."""
    models = {}

    def run(name):
        model = tiny_llama(tok)  # the same seeded initial weights each time
        cfg = UnlearnConfig(objective="npo", smoother="sam", lr=1e-3, steps=4, batch_size=2, max_length=64,
                            rho=0.1, save_every=2)
        unlearn(model, tok, FORGET, RETAIN, cfg, run_dir=tmp_path / name)
        models[name] = model

    def result(name):
        return strip(RunDir(tmp_path / name).metrics()), {k: v.tolist() for k, v in models[name].state_dict().items()}

    assert kill_everywhere(monkeypatch, run, result) >= 2 * 8
