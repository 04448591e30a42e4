"""`samsuite train`: a small CNN on the embedded digits data with SGD and every SAM-family member.

All optimizers train in lockstep from the same initial weights on the same batches, and their
steps are timed round-robin, so the time-per-step ratios to SGD come from one run in which
machine noise hits every optimizer alike. Results: `runs/<name>/` with `metrics.jsonl` (one
record per optimizer and epoch), `results.csv`/`results.md`, `curves.png`, `summary.json`
and a safetensors checkpoint per epoch from which a killed run resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared import BASE_OPTIMIZERS, OPTIMIZERS, SharpnessAware, build_optimizer, chunk, sam_backward
from shared.config import ConfigError, check_finite, to_dict
from shared.digits import digits_split
from shared.errors import Diverged
from shared.models import DigitsCNN
from shared.report import learning_curves, write_table
from shared.runio import RunDir, check_run_name, environment
from shared.seeding import derive_seed, seed_everything
from shared.validate import check_nonnegative, check_positive, check_range

# Settings that do not change a run's numbers: a run may resume with other values.
RESUME_NEUTRAL = ("name", "out_dir", "resume", "threads", "max_loss")


def _default_options() -> dict[str, dict[str, Any]]:
    # Radii from the papers' CIFAR settings, scaled down for a 30k-parameter CNN: SAM 0.05,
    # ASAM 0.5 (Kwon et al.: ~10x SAM), GSAM alpha 0.1 with rho following the cosine lr down to
    # 0.005, OBF gamma 1e-12 (the reference code's ResNet setting) with sigmoid predictions.
    return {
        "sam": {"rho": 0.05},
        "asam": {"rho": 0.5},
        "gsam": {"rho": 0.05, "alpha": 0.1, "rho_min": 0.005},
        "obf": {"rho": 0.05, "gamma": 1e-12},
    }


@dataclass
class TrainConfig:
    """`samsuite train` settings; override any with key=value (e.g. epochs=5 options.sam.rho=0.1)."""

    name: str = "train-digits"
    out_dir: str = "runs"
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam", "asam", "gsam", "obf"])
    base: str = "sgd"
    options: dict[str, dict[str, Any]] = field(default_factory=_default_options)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    m: int | None = None  # m-sharpness: micro-batch size of each perturbation (None: whole batch)
    grad_accum: int = 1  # micro-batches per step (e from their accumulated gradient)
    width: int = 32
    test_size: float = 0.25
    split_seed: int = 0
    seed: int = 0
    threads: int | None = None
    max_loss: float = 1e4  # a training loss above this (or NaN) stops the run as diverged
    resume: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        check_run_name(self.name)
        if not self.optimizers:
            raise ConfigError("optimizers: expected at least one optimizer")
        allowed = OPTIMIZERS.names() + BASE_OPTIMIZERS.names()
        for i, name in enumerate(self.optimizers):
            if name.lower() not in allowed:
                raise ConfigError(f"optimizers[{i}]: unknown optimizer '{name}'. Allowed: {', '.join(allowed)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"optimizers: listed twice in {self.optimizers}")
        if self.base not in BASE_OPTIMIZERS:
            raise ConfigError(BASE_OPTIMIZERS.unknown_message(self.base, "base"))
        for key in self.options:
            if key not in OPTIMIZERS:
                raise ConfigError(OPTIMIZERS.unknown_message(key, f"options.{key}"))
        for key in ("epochs", "batch_size", "grad_accum", "width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.m is not None and not 1 <= self.m <= self.batch_size:
            raise ConfigError(f"m: expected 1 <= m <= batch_size ({self.batch_size}), got {self.m}")
        if self.m is not None and self.grad_accum > 1:
            raise ConfigError("m, grad_accum: set one of them (m-sharpness already splits the batch)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: expected an integer >= 1 (or null: torch's choice), got {self.threads}")
        try:
            check_positive("lr", self.lr)
            check_positive("max_loss", self.max_loss)
            check_range("momentum", self.momentum, 0.0, 1.0 - 1e-12)
            check_nonnegative("weight_decay", self.weight_decay)
            check_range("test_size", self.test_size, 1e-6, 1 - 1e-6)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for name in self.optimizers:  # every optimizer's options are checked before any work
            try:
                self.optimizer(name, [torch.zeros(1, requires_grad=True)])
            except (ValueError, TypeError) as err:
                where = f"options.{name}" if name in OPTIMIZERS else f"optimizers ({name})"
                key, sep, rest = str(err).partition(": ")
                raise ConfigError(f"{where}.{key}: {rest}" if sep and key.isidentifier() else f"{where}: {err}") from None

    def optimizer(self, name: str, params: Any) -> torch.optim.Optimizer:
        """Optimizer `name` of this comparison over `params`, with its options."""
        kwargs = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}
        if name in OPTIMIZERS:
            return build_optimizer(name, params, self.base, **self.options.get(name, {}), **kwargs)
        return build_optimizer(name, params, **kwargs)


@dataclass
class _Arm:
    """One optimizer being compared: its model, optimizer, scheduler and timings."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step_times: list[float] = field(default_factory=list)


def _make_arm(name: str, cfg: TrainConfig, init: dict[str, Tensor], steps_total: int) -> _Arm:
    model = DigitsCNN(width=cfg.width)
    model.load_state_dict(init)
    opt = cfg.optimizer(name, model.parameters())
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return _Arm(name, model, opt, sched)


def _micro_batches(batch: tuple[Tensor, Tensor], cfg: TrainConfig) -> list[tuple[Tensor, Tensor]]:
    if cfg.m is not None:
        return chunk(batch, cfg.m)
    return chunk(batch, math.ceil(len(batch[1]) / cfg.grad_accum))


def train_step(arm: _Arm, batch: tuple[Tensor, Tensor], cfg: TrainConfig) -> None:
    """One optimizer step of `arm` on `batch` (SAM members through the one driver)."""
    model, opt = arm.model, arm.opt
    parts = _micro_batches(batch, cfg)
    descent: Callable[[tuple[Tensor, Tensor]], Tensor] = lambda b: F.cross_entropy(model(b[0]), b[1])
    if isinstance(opt, SharpnessAware):
        ascent = None
        if opt.ascent_loss is not None:
            ascent = lambda b: opt.ascent_loss(model(b[0]), b[1])
        sam_backward(opt, parts, descent, ascent=ascent, m_sharpness=cfg.m is not None, model=model)
    else:
        opt.zero_grad(set_to_none=False)
        for part in parts:
            (descent(part) / len(parts)).backward()
    opt.step()
    arm.sched.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train every optimizer of `cfg`; returns the summary (also written to summary.json)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    x_train, y_train, x_test, y_test = digits_split(cfg.test_size, cfg.split_seed)
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    with RunDir.claim(cfg.out_dir, cfg.name, "train") as run:
        config = to_dict(cfg)
        seed_everything(cfg.seed)
        init = DigitsCNN(width=cfg.width).state_dict()
        arms = [_make_arm(name, cfg, init, cfg.epochs * steps_per_epoch) for name in cfg.optimizers]
        start_epoch = _resume(run, arms, config) if cfg.resume else 0
        if start_epoch == 0:  # a fresh start: no stale checkpoint may be resumed from later
            run.truncate_metrics(0)
            run.remove_checkpoint()
        run.write_config(config)
        saved = start_epoch or None
        progress = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=cfg.name,
                        unit="step")
        for epoch in range(start_epoch, cfg.epochs):
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch)))
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                batch = (x_train[idx], y_train[idx])
                for arm in arms:  # round-robin: every optimizer sees the same batch and the same noise
                    t0 = time.perf_counter()
                    train_step(arm, batch, cfg)
                    arm.step_times.append(time.perf_counter() - t0)
                progress.update()
            records = [_epoch_record(arm, epoch, (x_train, y_train, x_test, y_test)) for arm in arms]
            for record in records:
                if not (math.isfinite(record["train_loss"]) and record["train_loss"] <= cfg.max_loss):
                    progress.close()
                    raise Diverged(f"epoch {epoch + 1}, optimizer {record['optimizer']}",
                                   f"training loss {record['train_loss']:.4g}, limit max_loss={cfg.max_loss:g}",
                                   _checkpoint_path(run) if saved else None, f"epoch {saved}",
                                   f"Lower lr (or that optimizer's rho in options), or raise max_loss; the same "
                                   f"command{' resumes from it' if saved else ' starts over'}.")
                run.log(record)
            progress.set_postfix({r["optimizer"]: f"{r['test_acc']:.3f}" for r in records})
            _save(run, arms, config, epoch + 1)
            saved = epoch + 1
        progress.close()
        return _finish(run, arms, cfg, config)


def _epoch_record(arm: _Arm, epoch: int, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    train_loss, train_acc = evaluate(arm.model, x_train, y_train)
    test_loss, test_acc = evaluate(arm.model, x_test, y_test)
    return {"optimizer": arm.name, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "lr": arm.sched.get_last_lr()[0]}


def _checkpoint_path(run: RunDir) -> Path:
    return run.path / "checkpoint.safetensors"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_NEUTRAL}


def _save(run: RunDir, arms: list[_Arm], config: dict[str, Any], epoch: int) -> None:
    state = {"epoch": epoch, "config": _comparable(config)}
    for arm in arms:
        state[arm.name] = {"model": arm.model.state_dict(), "opt": arm.opt.state_dict(),
                           "sched": arm.sched.state_dict(), "step_times": arm.step_times}
    run.save_checkpoint(state)


def _resume(run: RunDir, arms: list[_Arm], config: dict[str, Any]) -> int:
    """Load the last checkpoint of an identical config; returns the epoch to continue from."""
    def check(state: dict[str, Any]) -> None:
        if state["config"] != _comparable(config):
            raise ConfigError(f"{run.path}: holds a run with a different config; choose another name= or set "
                              "resume=false")

    state = run.load_checkpoint(check=check)
    if state is None:
        return 0
    for arm in arms:
        saved = state[arm.name]
        arm.model.load_state_dict(saved["model"])
        arm.opt.load_state_dict(saved["opt"])
        arm.sched.load_state_dict(saved["sched"])
        arm.step_times = list(saved["step_times"])
    return state["epoch"]


def _finish(run: RunDir, arms: list[_Arm], cfg: TrainConfig, config: dict[str, Any]) -> dict[str, Any]:
    records = run.metrics()
    baseline = next((a for a in arms if a.name == cfg.base), None)
    base_time = sum(baseline.step_times) / len(baseline.step_times) if baseline else None
    rows = []
    for arm in arms:
        mine = [r for r in records if r["optimizer"] == arm.name]
        last = mine[-1]
        mean_time = sum(arm.step_times) / len(arm.step_times)
        rows.append({
            "optimizer": arm.name,
            "test_acc": round(last["test_acc"], 4),
            "best_test_acc": round(max(r["test_acc"] for r in mine), 4),
            "train_loss": round(last["train_loss"], 5),
            "test_loss": round(last["test_loss"], 4),
            f"step_time_vs_{cfg.base}": round(mean_time / base_time, 3) if base_time else None,
        })
    write_table(run.path / "results", rows, title=f"Digits CNN, {cfg.epochs} epochs, seed {cfg.seed}")
    learning_curves(run.path / "curves.png", records, title="Digits CNN: SGD vs SAM family")
    summary = {"results": rows, "config": config, "seed": cfg.seed, "environment": environment()}
    run.write_json("summary.json", summary)
    return summary
