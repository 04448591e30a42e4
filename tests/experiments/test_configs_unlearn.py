"""Every unlearning config loads through RunConfig (no unknown keys, every method and seed valid), the
paper-scale ones keep the reference settings and state their GPU memory, the toy sweep covers
every objective x {none, sam, rs} with 3 seeds, and the matched configs hold out a validation split the
benchmark's format supports and keep the methods of their unmatched counterparts."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.objectives import OBJECTIVES
from unlearn.pipeline import RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs" / "unlearn").glob("*.yaml"))
PAPER = ("wmdp_zephyr", "muse_news", "muse_books", "wmdp_zephyr_matched", "muse_news_matched")


def test_the_configs_are_there():
    assert {p.stem for p in CONFIGS} >= {*PAPER, "toy_sweep", "toy_smollm2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_loads_without_unknown_keys_and_every_method_builds(path: Path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig) and cfg.name == path.stem.replace("_", "-")
    for i in range(len(cfg.methods)):
        for seed in cfg.seeds:
            method = cfg.method_config(i, seed)
            assert method.seed == seed and method.objective in OBJECTIVES
    for seed in cfg.seeds:
        cfg.unit_relearn(seed)


@pytest.mark.parametrize("stem", PAPER)
def test_paper_configs_state_their_gpu_memory_and_fit_one_gpu(stem: str):
    path = next(p for p in CONFIGS if p.stem == stem)
    text = path.read_text()
    assert "GPU memory" in text and "80 GB" in text
    cfg = load_run_config(path)
    assert (cfg.device, cfg.dtype, cfg.keep_models) == ("cuda", "bfloat16", False)
    for i in range(len(cfg.methods)):
        method = cfg.method_config(i, 0)
        assert method.gradient_checkpointing and method.bf16


def test_wmdp_keeps_unlearn_smooth_settings():
    cfg = load_run_config(next(p for p in CONFIGS if p.stem == "wmdp_zephyr"))
    assert cfg.model == "HuggingFaceH4/zephyr-7b-beta" and cfg.subsets == ["wmdp-bio"]
    methods = {cfg.method_label(i): cfg.method_config(i, 0) for i in range(len(cfg.methods))}
    assert set(methods) == {"npo", "npo+sam", "npo+rs", "npo+gp", "npo+wa", "rmu", "rmu+sam"}
    npo, sam, rs, rmu = methods["npo"], methods["npo+sam"], methods["npo+rs"], methods["rmu"]
    assert (npo.lr, npo.beta, npo.gamma, npo.steps, npo.batch_size) == (5e-6, 0.0225, 1.0, 125, 4)
    assert (sam.lr, sam.beta, sam.gamma, sam.rho) == (5e-6, 0.015, 2.25, 0.01)
    assert (rs.lr, rs.sigma, rs.rs_samples) == (1e-5, 1e-4, 3)
    assert (rmu.rmu_layer, rmu.rmu_update_layers, rmu.rmu_steering, rmu.gamma, rmu.lr, rmu.steps) == (
        7, [5, 6, 7], 6.5, 1200.0, 5e-5, 150)
    assert (methods["npo+wa"].wa_start, methods["npo+wa"].wa_every) == (100, 5)
    assert 20 <= cfg.relearn.n_samples <= 60 and cfg.relearn.lr == 1e-5


@pytest.mark.parametrize("stem, steps", [("muse_news", (100, 150)), ("muse_books", (50, 100))])
def test_muse_relearns_for_the_reference_steps(stem: str, steps: tuple[int, int]):
    cfg = load_run_config(next(p for p in CONFIGS if p.stem == stem))
    assert cfg.relearn.steps == steps[1] and cfg.relearn.n_samples is None and cfg.relearn.lr == 1e-5
    assert steps[0] in range(0, cfg.relearn.steps + 1, cfg.relearn.eval_every)  # the curve passes both ends
    labels = [cfg.method_label(i) for i in range(len(cfg.methods))]
    assert labels == ["npo", "npo+sam", "graddiff", "graddiff+sam"]
    npo = cfg.method_config(0, 0)
    assert (npo.lr, npo.beta, npo.epochs, npo.batch_size * npo.grad_accum, npo.max_length) == (1e-5, 0.1, 10.0, 32, 2048)


def test_toy_sweep_covers_every_objective_and_smoother_with_three_seeds():
    cfg = load_run_config(next(p for p in CONFIGS if p.stem == "toy_sweep"))
    pairs = {(cfg.method_config(i, 0).objective, cfg.method_config(i, 0).smoother) for i in range(len(cfg.methods))}
    objectives = [name for name in OBJECTIVES.names() if name != "nll"]
    assert pairs == {(o, s) for o in objectives for s in ("none", "sam", "rs")}
    assert len(cfg.seeds) == 3 and cfg.benchmark == "toy" and cfg.device == "cpu"


def test_the_four_gpu_wmdp_config_is_the_one_gpu_config_without_gp():
    """The same runs (the same numbers), with WA on the full weights, and what 4 processes cannot run left out."""
    from shared.config import ConfigError
    from unlearn.distributed import World, check_world

    one, four = (load_run_config(next(p for p in CONFIGS if p.stem == stem)) for stem in ("wmdp_zephyr", "wmdp_zephyr_fsdp4"))
    labels = {cfg.method_label(i): cfg.method_config(i, 0) for cfg in (one,) for i in range(len(cfg.methods))}
    mine = {four.method_label(i): four.method_config(i, 0) for i in range(len(four.methods))}
    assert set(mine) == set(labels) - {"npo+gp"}
    for label, method in mine.items():
        if label != "npo+wa":
            assert method == labels[label], label
    assert not mine["npo+wa"].lora and mine["npo+wa"].lr == 5.5e-6
    assert (four.relearn, four.eval, four.dtype) == (one.relearn, one.eval, one.dtype)
    text = next(p for p in CONFIGS if p.stem == "wmdp_zephyr_fsdp4").read_text()
    assert "GPU memory per GPU" in text and "--nproc 4" in text
    for method in [*mine.values(), four.relearn.train_config(0)]:
        check_world(method, World(0, 4))
        with pytest.raises(ConfigError, match="batch_size: 4 rows per micro-batch cannot be shared evenly by 8"):
            check_world(method, World(0, 8))


def test_the_matched_toy_protocol_covers_every_objective_and_smoother_with_three_attacks():
    cfg = load_run_config(next(p for p in CONFIGS if p.stem == "toy_matched"))
    pairs = {(cfg.method_config(i, 0).objective, cfg.method_config(i, 0).smoother) for i in range(len(cfg.methods))}
    objectives = [name for name in OBJECTIVES.names() if name != "nll"]
    assert pairs == {(o, s) for o in objectives for s in ("none", "sam", "rs", "gp", "wa")}
    assert len(cfg.seeds) == 5 and cfg.matched is not None and cfg.matched.band == 0.05
    assert cfg.attack_names() == ["relearn", "lora", "unrelated"]
    lora, unrelated = cfg.unit_relearn(0, "lora"), cfg.unit_relearn(0, "unrelated")
    assert lora.options["lora"] and lora.options["lora_alpha"] == 16.0 and len(lora.options["lora_targets"]) == 7
    assert (unrelated.data, unrelated.n_samples) == ("retain", 10)
    assert len(cfg.baselines()) == 20 and all(w.wa_start <= cfg.matched.budgets[0] for w in
                                             (cfg.method_config(i, 0) for i in range(len(cfg.methods))))


@pytest.mark.parametrize("stem, reference", [("wmdp_zephyr_matched", "wmdp_zephyr"),
                                             ("muse_news_matched", "muse_news")])
def test_the_matched_paper_configs_split_their_benchmark_and_keep_the_reference_methods(stem: str, reference: str):
    """The same methods as the reference config (learning rates, objectives' and smoothers' settings), with a
    constant schedule (the calibration's model is then the run's), a validation split held out of the
    benchmark's questions, and the attacks of Unlearn-Smooth and Lucki et al."""
    from unlearn.benchmarks import Benchmark, build_toy
    from unlearn.eval import available_metrics
    from unlearn.matched import check_validation, split_validation

    cfg, ref = (load_run_config(next(p for p in CONFIGS if p.stem == s)) for s in (stem, reference))
    mine = {cfg.method_label(i): cfg.method_config(i, 0) for i in range(len(cfg.methods))}
    theirs = {ref.method_label(i): ref.method_config(i, 0) for i in range(len(ref.methods))}
    assert set(mine) == set(theirs)
    kept = ("objective", "smoother", "lr", "beta", "gamma", "rho", "sigma", "rs_samples", "lora", "rmu_layer",
            "rmu_steering", "batch_size", "grad_accum", "max_length", "bf16", "gradient_checkpointing")
    for label, method in mine.items():
        assert method.schedule == "constant", label
        assert {k: getattr(method, k) for k in kept} == {k: getattr(theirs[label], k) for k in kept}, label
    assert len(cfg.seeds) == 3 and cfg.matched.split is not None
    assert cfg.attack_names() == ["relearn", "lora", "unrelated"] and cfg.relearn == ref.relearn.__class__(
        **{**vars(ref.relearn), "draws": cfg.relearn.draws})
    lora, unrelated = cfg.unit_relearn(0, "lora"), cfg.unit_relearn(0, "unrelated")
    assert (lora.lr, lora.options["lora_r"], lora.options["lora_alpha"]) == (2e-4, 128, 16.0)
    assert len(lora.options["lora_targets"]) == 7 and unrelated.n_samples == 10 and unrelated.data != "forget"
    toy = build_toy(0)  # the benchmark's format: WMDP has multiple choice only, MUSE its tables only
    bench = Benchmark(cfg.benchmark, mc={k: toy.mc[k] for k in ("forget", "utility")}) if cfg.benchmark == "wmdp" \
        else Benchmark(cfg.benchmark, muse={k: v for k, v in toy.muse.items()})
    split = split_validation(bench, cfg.matched.split, cfg.matched.split_seed)
    check_validation(split, cfg.matched, available_metrics(split))
    assert set(cfg.matched.validation_metrics()) <= set(available_metrics(split))


def test_the_matched_smollm2_config_is_issue_17s_run():
    cfg = load_run_config(next(p for p in CONFIGS if p.stem == "toy_smollm2_matched"))
    assert [cfg.method_label(i) for i in range(len(cfg.methods))] == ["npo", "npo+sam"] and len(cfg.seeds) == 3
    assert cfg.prepare.scale == "smollm2" and cfg.matched is not None and cfg.matched.split is None
    assert (cfg.relearn.data, cfg.relearn.draws) == ("forget", 3) and cfg.unit_relearn(0, "lora").draws == 1
    assert all(cfg.method_config(i, 0).schedule == "constant" for i in range(2))
