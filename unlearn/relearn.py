"""The relearning attack (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted
Relearning Attacks", as Fan et al. 2025 use it to test unlearning): fine-tune an unlearned model
on N samples of its forget set with the one training loop (objective "nll", never smoothed) and
evaluate the forget metrics along the way, giving a curve of recovered knowledge against
relearning steps. Lower recovered knowledge = more resilient unlearning.

Each of `draws` attacks draws its N samples with a generator seeded by (seed, draw) and starts from
the same unlearned weights: a CPU copy of the state dict is taken once and loaded before every draw
and again at the end, so the caller gets its model back as it passed it. The curves are averaged
over the draws (mean, and sample standard deviation when there are two draws or more).

Defaults follow Unlearn-Smooth's WMDP attack (`configs/unlearn/wmdp/Relearn+Forget.json`, README:
60 forget samples = 15 steps at batch 4, one epoch, lr 1e-5; "same data, more epochs" with 3
epochs); its MUSE attack (`run_muse_relearn.sh`) fine-tunes on the forget set for 100/125/150 steps
(News) or 50/75/100 (Books) at lr 1e-5, batch 4, max length 2048.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import nn

from shared.config import ConfigError, check_finite, from_dict, to_dict
from shared.runio import read_result, write_json
from shared.seeding import derive_seed
from shared.stats import mean_std  # also re-exported: unlearn.pipeline imports it from here
from unlearn.distributed import device_of, on_main, world
from unlearn.train import UnlearnConfig, unlearn

if TYPE_CHECKING:
    from unlearn.benchmarks import Benchmark

EvalFn = Callable[[nn.Module, int], dict[str, Any]]
#: The forget-side metrics a relearning curve follows by default (those the benchmark has).
FORGET_METRICS = ("forget_acc", "forget_acc_cloze", "verbmem_f", "knowmem_f")
#: Fields of the fine-tuning that RelearnConfig sets itself (not allowed in `options`).
OWN_FIELDS = ("objective", "smoother", "lr", "steps", "epochs", "batch_size", "grad_accum", "max_length", "seed",
              "eval_every", "save_every", "resume")


@dataclass
class RelearnConfig:
    """One relearning attack: `draws` fine-tunings on `n_samples` texts each, of the forget corpus or
    (`data`) of a corpus unrelated to it."""

    data: Literal["forget", "retain", "holdout"] = field(default="forget", metadata={
        "help": "the corpus fine-tuned on: forget (relearning), or retain / holdout texts unrelated to the forget set "
                "(Lucki et al. 2024: a few unrelated examples bring most of it back)"})
    n_samples: int | None = field(default=60, metadata={"help": "forget texts per draw (WMDP: 20-60); None: all"})
    draws: int = field(default=3, metadata={"help": "independent sample draws, averaged"})
    lr: float = 1e-5
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; None: from epochs (MUSE: 100-150)"})
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    eval_every: int = field(default=5, metadata={"help": "evaluate every N steps (always at step 0 and the end)"})
    metrics: list[str] | None = field(default=None, metadata={"help": "curve metrics; None: the forget metrics"})
    seed: int = 0
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "further fine-tuning settings (UnlearnConfig fields): bf16, gradient_checkpointing, lora, "
                          "weight_decay, schedule, max_grad_norm, base_optimizer ..."},
    )

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("n_samples", "draws"):
            value = getattr(self, name)
            if name == "n_samples" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("metrics: expected at least one metric (or null for the forget metrics)")
        own = sorted(set(self.options) & set(OWN_FIELDS))
        if own:
            raise ConfigError(f"options.{own[0]}: set by the relearning attack itself; use the top-level field "
                              f"(relearn.{own[0]}) where there is one")
        self.train_config(0)  # the fine-tuning settings are checked here, before any model is loaded

    def train_config(self, draw: int) -> UnlearnConfig:
        """The fine-tuning of draw `draw`: plain NLL, checkpoint only at the end, its own data-order seed."""
        return from_dict(UnlearnConfig, {
            **self.options, "objective": "nll", "smoother": "none", "lr": self.lr, "steps": self.steps,
            "epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "max_length": self.max_length, "eval_every": self.eval_every, "save_every": 0,
            "seed": derive_seed(self.seed, "relearn-train", draw) % 2**31,
        }, "options")


def draw_samples(pool_size: int, n: int | None, seed: int, draw: int, corpus: str = "forget") -> list[int]:
    """The indices of draw `draw`'s `n` samples among `pool_size` texts (without replacement);
    `n` None: every text (MUSE's attack fine-tunes on the whole forget set)."""
    if n is None:
        return list(range(pool_size))
    if n > pool_size:
        raise ConfigError(f"n_samples: {n} is more than the {pool_size} texts of the {corpus} set")
    rng = np.random.default_rng(derive_seed(seed, "relearn-samples", draw))
    return [int(i) for i in rng.choice(pool_size, size=n, replace=False)]


def curve_stats(curves: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and sample std (None for a single curve) over curves evaluated at the same steps:
    rows {"step", m, m + "_std" for each metric m}."""
    if not curves:
        raise ValueError("curves: expected at least one curve")
    steps = [r["step"] for r in curves[0]]
    for curve in curves[1:]:
        if [r["step"] for r in curve] != steps:
            raise ValueError(f"curves: evaluated at different steps ({steps} vs {[r['step'] for r in curve]})")
    out = []
    for i, step in enumerate(steps):
        row: dict[str, Any] = {"step": step}
        for name in (k for k in curves[0][i] if k != "step"):
            row[name], row[f"{name}_std"] = mean_std([curve[i][name] for curve in curves])
        out.append(row)
    return out


def _texts_hash(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def relearn(
    model: nn.Module,
    tokenizer: Any,
    forget_pool: Sequence[str],
    cfg: RelearnConfig,
    *,
    eval_fn: EvalFn | None = None,
    run_dir: str | Path | None = None,
    resume: bool = True,
    initial: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Attack `model` `cfg.draws` times; returns {"config", "pool_size", "draws": [{"draw", "samples",
    "curve", ...}], "curve": mean/std rows, "final": the last row, "time_s"}. `eval_fn(model, step)`
    gives the curve's values (without it, the curve is empty). With `run_dir`, each draw logs to
    `run_dir`/draw<k>/ (metrics.jsonl per step) and, with `resume`, a finished draw with the same
    settings is not run again and an interrupted one continues from its checkpoint. Every draw starts from
    the same weights, so step 0 is evaluated once; `initial` (the curve's values of `model` as given, e.g.
    its evaluation after unlearning) replaces even that one."""
    pool = list(forget_pool)
    if not pool:
        raise ValueError("forget_pool: expected at least one forget text, got none")
    draw_samples(len(pool), cfg.n_samples, cfg.seed, 0, cfg.data)  # n_samples vs the pool: checked before any training
    if eval_fn is not None:
        eval_fn = _start_evaluated_once(eval_fn, initial)
    start = time.perf_counter()
    device = device_of(model)
    if world().size > 1:
        # the training shards the model it trains, for good: each draw trains a copy of the unlearned
        # model, which waits on the CPU meanwhile
        model.to("cpu")

        def fresh() -> nn.Module:
            return copy.deepcopy(model).to(device)

        def restore() -> None:
            model.to(device)
    else:
        initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        def fresh() -> nn.Module:
            model.load_state_dict(initial)
            return model

        def restore() -> None:
            model.load_state_dict(initial)
    draws = []
    try:
        for draw in range(cfg.draws):
            draws.append(_attack(fresh, tokenizer, pool, cfg, draw, eval_fn,
                                 None if run_dir is None else Path(run_dir) / f"draw{draw}", resume))
    finally:
        restore()
    curve = curve_stats([d["curve"] for d in draws]) if eval_fn is not None else []
    result = {
        "config": to_dict(cfg),
        "pool_size": len(pool),
        "draws": draws,
        "curve": curve,
        "final": {k: v for k, v in curve[-1].items() if k != "step"} if curve else {},
        "time_s": round(time.perf_counter() - start, 3),
    }
    if run_dir is not None and world().main:
        write_json(Path(run_dir) / "relearn.json", result)
    return result


def _start_evaluated_once(eval_fn: EvalFn, initial: Mapping[str, Any] | None) -> EvalFn:
    known = dict(initial) if initial is not None else None

    def once(model: nn.Module, step: int) -> dict[str, Any]:
        nonlocal known
        if step != 0:
            return eval_fn(model, step)
        if known is None:
            known = eval_fn(model, 0)
        return dict(known)

    return once


def _attack(
    fresh: Callable[[], nn.Module], tokenizer: Any, pool: list[str], cfg: RelearnConfig, draw: int,
    eval_fn: EvalFn | None, run_dir: Path | None, resume: bool,
) -> dict[str, Any]:
    """One draw: fine-tune `fresh()` (the unlearned weights) on its samples; its curve."""
    samples = draw_samples(len(pool), cfg.n_samples, cfg.seed, draw)
    texts = [pool[i] for i in samples]
    train_cfg = replace(cfg.train_config(draw), resume=resume)
    key = {"config": to_dict(train_cfg), "samples": samples, "data": _texts_hash(texts), "eval": eval_fn is not None}
    done = run_dir / "draw.json" if run_dir is not None else None
    w = world()
    record = on_main(lambda: read_result(done), w) if resume and done is not None else None
    if isinstance(record, dict) and {k: record.get(k) for k in key} == key:
        return record
    summary = unlearn(fresh(), tokenizer, texts, None, train_cfg, run_dir=run_dir, eval_fn=eval_fn,
                      replace_stale=True)  # the draw's folder: a checkpoint of other settings is left over
    record = {
        "draw": draw, **key,
        "steps": summary["steps"],
        "final_loss": summary["final"].get("loss"),
        "curve": [{k: v for k, v in r.items() if k != "kind"} for r in summary["evals"]],
        "time_s": summary["time_s"],
        "time": {"train_s": summary["train_time_s"], "eval_s": summary["eval_time_s"]},
    }
    if run_dir is not None and w.main:
        for leftover in run_dir.glob("checkpoint.*"):  # the weights were only needed to resume this draw
            leftover.unlink()
        write_json(done, record)
    return record


def curve_metrics(bench: Benchmark, wanted: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The metrics a relearning curve follows: `wanted`, else the forget metrics among `available`."""
    if wanted is not None:
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ConfigError(f"relearn.metrics: {bench.name} cannot compute {missing}; it has: {', '.join(available)}")
        return list(wanted)
    return [m for m in FORGET_METRICS if m in available]


def benchmark_eval_fn(
    tokenizer: Any, bench: Benchmark, metrics: Sequence[str], *, max_samples: int | None = None, batch_size: int = 16,
) -> EvalFn:
    """`eval_fn(model, step)` for a curve: `metrics` of `bench` (see `unlearn.eval.evaluate`)."""
    from unlearn.eval import evaluate

    def eval_fn(model: nn.Module, step: int) -> dict[str, Any]:
        return evaluate(model, tokenizer, bench, metrics=list(metrics), max_samples=max_samples, batch_size=batch_size)

    return eval_fn

