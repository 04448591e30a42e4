"""The one training loop, for every objective x smoother (and, with objective "nll", for plain
fine-tuning: the benchmark's target/retrain models and the relearning attack).

Each step draws `batch_size * grad_accum` forget rows (and as many retain rows) from seeded
per-epoch permutations, splits them into `grad_accum` micro-batches, lets the smoother leave the
gradient of l_f + gamma * l_r in `.grad`, clips, checks the loss, and takes the optimizer step.
Everything that decides a step is a function of (seed, step), so a run resumed from its
safetensors checkpoint repeats the uninterrupted run. The model is updated in place (LoRA
adapters are merged into it at the end).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared.config import ConfigError, check_finite, to_dict
from shared.errors import Diverged
from shared.registry import Registry
from shared.runio import RunDir, environment
from shared.sam import BASE_OPTIMIZERS
from shared.sam.shards import local, shard_like
from shared.seeding import derive_seed, seed_everything
from unlearn.data import make_micro_batches, tokenize_texts
from unlearn.distributed import (
    World,
    broadcast,
    check_split,
    check_world,
    device_of,
    full,
    gather,
    reshard,
    scatter_optimizer_state,
    shard_model,
    world,
)
from unlearn.objectives import OBJECTIVES, Objective, ObjectiveContext, SetupData
from unlearn.smoothers import SMOOTHERS, Smoother, StepTerms

EvalFn = Callable[[nn.Module, int], dict[str, Any]]
StopFn = Callable[[int, dict[str, Any]], bool]  # (step, the evaluation's values) -> end the run here


class _Stale(ConfigError):
    """A checkpoint of another config or other data in the run folder."""


SAM_SMOOTHERS = ("sam", "asam", "gsam")


@dataclass
class UnlearnConfig:
    """One unlearning (or fine-tuning) run. Defaults follow Unlearn-Smooth's WMDP NPO settings where
    they exist; the embedded benchmark's configs override them for its tiny models."""

    objective: str = field(default="npo", metadata={"help": "nll | ga | graddiff | npo | simnpo | rmu"})
    smoother: str = field(default="none", metadata={"help": "none | sam | asam | gsam | rs | gp | wa"})
    # optimisation
    base_optimizer: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; None: from epochs"})
    epochs: float = 1.0
    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch (forget; as many retain), shared by "
                                                         "the processes of a multi-process run"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step"})
    max_length: int = 512
    max_grad_norm: float | None = 1.0
    # objective
    gamma: float = field(default=1.0, metadata={"help": "retain loss weight (RMU's alpha)"})
    beta: float = field(default=0.1, metadata={"help": "NPO / SimNPO inverse temperature"})
    delta: float = field(default=0.0, metadata={"help": "SimNPO margin"})
    rmu_layer: int = 7
    rmu_steering: float = 6.5
    rmu_update_layers: list[int] = field(default_factory=lambda: [5, 6, 7])
    rmu_params: list[str] = field(default_factory=lambda: ["mlp.down_proj"])
    # smoothing
    rho: float = field(default=0.01, metadata={"help": "SAM radius; gradient-penalty weight for gp"})
    sam_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "SAM-member options (eta, alpha)"})
    sigma: float = field(default=1e-4, metadata={"help": "randomized smoothing noise std"})
    rs_samples: int = 3
    wa_start: int = 100
    wa_every: int = 5
    # model
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (GPU)"})
    gradient_checkpointing: bool = False
    # run
    seed: int = 0
    eval_every: int = field(default=0, metadata={"help": "eval_fn every N steps (0: at the start and end only)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    max_loss: float = field(default=1e4, metadata={"help": "|loss| above this stops the run as exploding"})
    resume: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        for name, registry in (("objective", OBJECTIVES), ("smoother", SMOOTHERS), ("base_optimizer", BASE_OPTIMIZERS)):
            _check_name(registry, name, getattr(self, name))
        for name in ("lr", "rho", "sigma", "beta", "max_loss", "epochs", "rmu_steering"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: expected a value > 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "rs_samples", "wa_every", "lora_r", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("gamma", "weight_decay", "warmup_steps", "wa_start", "eval_every", "save_every", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: expected an integer >= 1 (or null to use epochs), got {self.steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm: expected a value > 0 (or null: no clipping), got {self.max_grad_norm}")
        if self.sam_options and self.smoother not in SAM_SMOOTHERS:
            allowed = ", ".join(SAM_SMOOTHERS)
            raise ConfigError(f"sam_options: only used by the smoothers {allowed}, not '{self.smoother}'")
        if self.lora and not self.lora_targets:
            raise ConfigError("lora_targets: expected at least one module name with lora=true")
        self.make_optimizer([torch.zeros(1, requires_grad=True)])  # its options are checked before any work

    def make_optimizer(self, params: list[Tensor]) -> tuple[Smoother, torch.optim.Optimizer]:
        """The smoother of this run and its optimizer over `params`; bad optimizer options are
        ConfigErrors naming the field (sam_options.alpha, ...)."""
        smoother: Smoother = SMOOTHERS.get(self.smoother)(self)
        try:
            return smoother, smoother.make_optimizer(params)
        except (TypeError, ValueError) as err:
            key, sep, rest = str(err).partition(": ")
            if sep and key in self.sam_options or "unknown option" in rest:
                raise ConfigError(f"sam_options.{key}: {rest}") from None
            raise ConfigError(str(err)) from None


def _check_name(registry: Registry, field_name: str, value: str) -> None:
    if value not in registry:
        raise ConfigError(registry.unknown_message(value, field_name))


class TrainingDiverged(Diverged):
    """A NaN or exploding loss (or gradient norm): the run stopped before applying the step."""

    def __init__(self, step: int, detail: str, checkpoint: Path | None, saved_at: int | None) -> None:
        super().__init__(f"step {step}", detail, checkpoint, f"step {saved_at}",
                         "Lower lr (or rho, sigma), or raise max_loss if the objective's loss is legitimately large; "
                         + ("the same command resumes from it." if checkpoint else "the same command starts over."))
        self.step = step


def unlearn(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[str],
    retain: Sequence[str] | None,
    cfg: UnlearnConfig,
    *,
    run_dir: str | Path | None = None,
    ref_model: nn.Module | None = None,
    eval_fn: EvalFn | None = None,
    stop: StopFn | None = None,
    replace_stale: bool = False,
) -> dict[str, Any]:
    """Train `model` in place with `cfg.objective` smoothed by `cfg.smoother`; returns the summary
    (also `run_dir`/summary.json, with config.yaml, metrics.jsonl and the checkpoint).

    `ref_model`: NPO's reference / RMU's frozen model (default: `model` as passed, before any
    step). `eval_fn(model, step)` runs at step 0, every `cfg.eval_every` steps and at the end; its
    results go to metrics.jsonl and the summary's "evals". With `run_dir` and `cfg.resume`, a run
    with the same config and data continues from its last checkpoint (pass the same initial model).
    `stop(step, values)`, asked after each evaluation before the last step, ends the run at that step when
    true: the smoother finishes and the checkpoint and the summary ("steps", "stopped") say that step,
    as a run of that many steps would end (the same run, when the learning rate does not depend on the
    total: a constant schedule). A resumed run that had stopped stops again at once. A checkpoint in
    `run_dir` from another config or other data is an error, or with `replace_stale` (a caller that owns
    the folder and has decided the run must happen with these settings) is discarded and the run starts over.
    """
    objective = OBJECTIVES.get(cfg.objective)
    forget, retain = list(forget), (list(retain) if retain is not None else None)
    use_retain = objective.retain is not None and cfg.gamma > 0
    _check_inputs(model, forget, retain, cfg, use_retain)
    if not use_retain:
        retain = None
    w = world()
    check_world(cfg, w)
    _check_world_inputs(forget, retain, ref_model, w)

    seed_everything(cfg.seed)
    device = device_of(model)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    forget_data = tokenize_texts(tokenizer, forget, cfg.max_length)
    retain_data = tokenize_texts(tokenizer, retain, cfg.max_length) if retain is not None else None
    if not (forget_data["labels"][:, 1:] != -100).any():
        raise ValueError("forget: every text is a single token; there is nothing to predict")
    ctx = ObjectiveContext(cfg, autocast=autocast)
    if objective.setup is not None and w.size == 1:  # before any change to the model: it is the reference
        objective.setup(model, ctx, SetupData(forget_data, retain_data, ref_model))

    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(forget) / per_step))
    if cfg.smoother == "wa" and total < cfg.wa_start:
        raise ConfigError(f"wa_start: {cfg.wa_start} is after the last step ({total}); no weights would be averaged")

    state = _Prepared.make(model, objective, cfg)
    try:
        if w.size > 1:
            # the reference values on the model as it is before any step (each rank computes its share of
            # the rows and the shares are summed), then shard what is trained (LoRA-wrapped or not)
            if objective.setup is not None:
                objective.setup(state.model, ctx, SetupData(forget_data, retain_data, None))
            state.sharded(w, cfg.bf16)
        summary = _train(state, cfg, objective, ctx, forget_data, retain_data, total, run_dir, eval_fn, stop,
                         replace_stale, _fingerprint(forget, retain), w)
    except BaseException:
        state.restore(merge=False)
        raise
    state.restore(merge=True)
    return summary


def _check_inputs(
    model: nn.Module, forget: list[str], retain: list[str] | None, cfg: UnlearnConfig, use_retain: bool
) -> None:
    """The bad inputs that would otherwise fail (or silently do nothing) after training started."""
    if not forget:
        raise ValueError("forget: expected at least one text, got an empty forget set")
    if use_retain and not retain:
        raise ValueError(
            f"retain: objective '{cfg.objective}' with gamma={cfg.gamma} needs a retain set, got "
            f"{'an empty one' if retain is not None else 'none'}; pass retain texts or set gamma=0"
        )
    if cfg.lora:
        names = [name for name, _ in model.named_modules()]
        for target in cfg.lora_targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
                raise ValueError(
                    f"lora_targets: the model has no module '{target}'; its linear modules are: {', '.join(linear)}"
                )


def _check_world_inputs(forget: list[str], retain: list[str] | None, ref_model: nn.Module | None, w: World) -> None:
    """What `w.size` processes cannot split or share, before any work."""
    if w.size == 1:
        return
    for name, texts in (("forget", forget), ("retain", retain)):
        if texts is not None:
            check_split(name, len(texts), w)
    if ref_model is not None:
        raise ConfigError("ref_model: a separate reference model is not sharded; on several processes the "
                          "reference is the model before its first step (leave ref_model unset)")


def _fingerprint(forget: list[str], retain: list[str] | None) -> str:
    """A hash of the texts: a checkpoint is only resumed on the data it was trained on."""
    digest = hashlib.sha256()
    for text in [*forget, "\0retain\0", *(retain or [])]:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclass
class _Prepared:
    """The model as trained (LoRA-wrapped or not) and what must be undone afterwards: the caller's
    requires_grad flags, use_cache, gradient checkpointing and the LoRA wrapping."""

    model: nn.Module  # what is trained (a PeftModel with LoRA)
    base: nn.Module  # the caller's model
    params: list[Tensor]
    names: list[str]
    flags: list[tuple[nn.Parameter, bool]]
    use_cache: Any
    checkpointing: bool
    flag_names: list[str] = field(default_factory=list)  # the names of `flags`' parameters in the caller's model

    @classmethod
    def make(cls, model: nn.Module, objective: Objective, cfg: UnlearnConfig) -> _Prepared:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        flag_names = [n for n, _ in model.named_parameters()]
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        trained = model
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
            trained = get_peft_model(model, lora)
        named = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
        if objective.trainable is not None:
            for n, p in named:
                p.requires_grad_(objective.trainable(n, cfg))
            named = [(n, p) for n, p in named if p.requires_grad]
        prepared = cls(trained, model, [p for _, p in named], [n for n, _ in named], flags, use_cache,
                       cfg.gradient_checkpointing, flag_names)
        if not named:
            prepared.restore(merge=False)
            raise ValueError(f"objective '{cfg.objective}': no parameter is left to train (check rmu_update_layers, "
                             "rmu_params and lora_targets)")
        if use_cache is not None:
            config.use_cache = False  # no KV cache while training
        if cfg.gradient_checkpointing:
            _checkpointing(model, True)
        return prepared

    def sharded(self, w: World, bf16: bool) -> None:
        """Shard the trained model over `w` (FSDP2 puts new DTensor parameters in place of the old
        ones): the trained list, and the flags to restore, then name the new parameters."""
        before = {n: flag for n, (_, flag) in zip(self.flag_names, self.flags)}
        shard_model(self.model, w, bf16=bf16)
        trained = set(self.names)
        named = [(n, p) for n, p in self.model.named_parameters() if n in trained]
        self.params, self.names = [p for _, p in named], [n for n, _ in named]
        renamed = ((n.replace(".base_layer", ""), p) for n, p in self.base.named_parameters())  # peft's wrapping
        self.flags = [(p, before[n]) for n, p in renamed if n in before]

    def restore(self, merge: bool) -> None:
        if self.checkpointing:
            _checkpointing(self.base, False)
        if self.model is not self.base:  # LoRA: merge the adapters into the caller's model (or drop them)
            self.model.merge_and_unload() if merge else self.model.unload()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        if self.use_cache is not None:
            self.base.config.use_cache = self.use_cache


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off: transformers 5 renamed the methods."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable() if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False}) if on else model.gradient_checkpointing_disable()


def _stream(n: int, start: int, count: int, seed: int, key: str) -> list[int]:
    """Positions start..start+count-1 of an endless stream of seeded permutations of range(n)."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, key, epoch)))
        out.append(int(perms[epoch][pos % n]))
    return out


def _train(
    state: _Prepared, cfg: UnlearnConfig, objective: Objective, ctx: ObjectiveContext,
    forget_data: dict[str, Tensor], retain_data: dict[str, Tensor] | None, total: int,
    run_dir: str | Path | None, eval_fn: EvalFn | None, stop: StopFn | None, replace_stale: bool, fingerprint: str,
    w: World,
) -> dict[str, Any]:
    from transformers import get_scheduler

    model, params = state.model, state.params
    device = device_of(model)
    smoother, opt = cfg.make_optimizer(params)
    schedule = "constant_with_warmup" if cfg.schedule == "constant" and cfg.warmup_steps else cfg.schedule
    sched = get_scheduler(schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    terms = StepTerms(
        forget=lambda pair: _under(ctx, objective.forget, model, pair[0]),
        retain=(lambda pair: _under(ctx, objective.retain, model, pair[1])) if retain_data is not None else None,
        gamma=cfg.gamma,
    )
    # batch_size is the whole step's micro-batch, which the processes share: the config (and what a
    # resume on any number of processes is checked against) does not depend on the number of processes
    config = to_dict(cfg)
    run = RunDir(run_dir) if run_dir is not None and w.main else None  # rank 0 alone writes the run folder
    history: list[dict[str, Any]] = []
    start, last_saved = 0, None

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if run is not None:
            run.log(record)

    def checkpoint(step: int) -> None:
        nonlocal last_saved
        # whole tensors (gathered from the shards by every rank), so that K processes resume on K'
        trainable = {n: full(p) for n, p in zip(state.names, params)}
        saved = {"step": step, "config": config, "data": fingerprint, "trainable": trainable,
                 "opt": gather(opt.state_dict()), "sched": sched.state_dict(), "smoother": smoother.state_dict()}
        if run is not None:
            run.save_checkpoint(saved)
        last_saved = step

    eval_times: list[float] = []

    def evaluate(step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        model.eval()
        with smoother.delivered():  # e.g. weight averaging's average so far: what a run ending here delivers
            result = eval_fn(model, step)
        model.train()
        if w.size > 1:
            reshard(model)  # FSDP2 keeps the root gathered after a forward without a backward: the smoothers'
            # writes into the shards would be missed by the next forward
        eval_times.append(time.perf_counter() - t0)
        log({"step": step, "kind": "eval", **result})
        return result

    def check(saved: dict[str, Any]) -> None:
        if saved["config"] != config or saved["data"] != fingerprint:
            raise _Stale(f"{run.path}: holds a run with another config or other data; use another run folder or "
                         "set resume=false")

    if run_dir is not None:
        try:
            saved = run.load_checkpoint(check=check) if run is not None and cfg.resume else None
        except _Stale:
            if not replace_stale:
                raise
            saved = None  # started over below: the checkpoint and its records are removed
        saved = broadcast(saved, w)  # rank 0 reads the run folder; every rank resumes from what it read
        if saved is not None:
            with torch.no_grad():
                for p, name in zip(params, state.names):
                    local(p).copy_(shard_like(saved["trainable"][name], p))
            opt.load_state_dict(scatter_optimizer_state(saved["opt"], params))
            sched.load_state_dict(saved["sched"])
            smoother.load_state_dict(saved["smoother"])
            start = last_saved = saved["step"]
            history = run.metrics() if run is not None else []
        elif run is not None:
            run.truncate_metrics(0)
            run.remove_checkpoint()
        if run is not None:
            run.write_config(config)

    model.train()
    if eval_fn is not None and start == 0:
        evaluate(0)
    planned = total
    if stop is not None and start > 0:  # a run that stopped at its checkpoint (saved after the smoother finished)
        at = next((r for r in history if r["kind"] == "eval" and r["step"] == start), None)
        values = {k: v for k, v in (at or {}).items() if k not in ("step", "kind")}
        if at is not None and start < total and stop(start, values):
            total = start
    n_forget, n_retain = len(forget_data["input_ids"]), (len(retain_data["input_ids"]) if retain_data else 0)
    per_step = cfg.batch_size * cfg.grad_accum  # each rank takes batch_size / w.size rows of every micro-batch
    progress = tqdm(total=total, initial=start, desc=f"{cfg.objective}+{cfg.smoother}", unit="step", disable=not w.main)
    t_start, step_times = time.perf_counter(), []
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        f_rows = _stream(n_forget, (step - 1) * per_step, per_step, cfg.seed, "forget")
        pairs = [(b.to(device), None) for b in make_micro_batches(forget_data, f_rows, cfg.grad_accum, w.rank, w.size)]
        if retain_data is not None:
            r_rows = _stream(n_retain, (step - 1) * per_step, per_step, cfg.seed, "retain")
            r_parts = make_micro_batches(retain_data, r_rows, cfg.grad_accum, w.rank, w.size)
            pairs = [(f, r.to(device)) for (f, _), r in zip(pairs, r_parts)]
        # each rank's losses are its share of the step's (the whole step's denominators): summed over ranks
        losses = {k: w.all_sum(v.detach().clone()).item() for k, v in smoother.backward(opt, pairs, terms, step).items()}
        losses["loss"] = losses["forget_loss"] + cfg.gamma * losses.get("retain_loss", 0.0)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
        if not (math.isfinite(losses["loss"]) and abs(losses["loss"]) <= cfg.max_loss and math.isfinite(grad_norm)):
            progress.close()
            path = run.path / "checkpoint.safetensors" if (run is not None and last_saved is not None) else None
            raise TrainingDiverged(step, f"loss {losses['loss']:.4g}, |loss| limit max_loss={cfg.max_loss:g}, gradient "
                                         f"norm {grad_norm:.4g}", path, last_saved)
        lr = opt.param_groups[0]["lr"]  # the rate this step uses
        opt.step()
        sched.step()
        smoother.after_step(step)
        step_times.append(time.perf_counter() - t0)
        log({"step": step, "kind": "train", "epoch": round(step * per_step / n_forget, 4),
             "lr": lr, **losses, "grad_norm": grad_norm, "step_time_s": step_times[-1]})
        progress.update()
        progress.set_postfix(loss=f"{losses['loss']:.4f}")
        if step == total:
            smoother.finish()  # weight averaging swaps in the average: what is evaluated and saved
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            values = evaluate(step)
            if stop is not None and step < total and stop(step, values):
                smoother.finish()  # as at the last step, after the evaluation (which saw the delivered weights)
                total = step
        if run_dir is not None and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
            checkpoint(step)
        if step == total:
            break
    progress.close()

    train_records = [r for r in history if r["kind"] == "train"]
    summary = {
        "objective": cfg.objective,
        "smoother": cfg.smoother,
        "steps": total,
        "stopped": total < planned,
        "resumed_from": start,
        "trainable_params": sum(p.numel() for p in params),
        "final": {k: v for k, v in train_records[-1].items() if k.endswith("loss")} if train_records else {},
        "time_s": round(time.perf_counter() - t_start, 3),
        "step_time_s": sum(step_times) / len(step_times) if step_times else None,
        # where this call's time went (time_s excludes the evaluation at step 0; these do not)
        "train_time_s": round(sum(step_times), 3),
        "eval_time_s": round(sum(eval_times), 3),
        "evals": [r for r in history if r["kind"] == "eval"],
        "config": config,
        "environment": environment(str(device)) | {"processes": w.size},
    }
    if run is not None:
        run.write_json("summary.json", summary)
    model.eval()
    return summary


def _under(ctx: ObjectiveContext, loss_fn: Callable, model: nn.Module, batch: Any) -> Tensor:
    """`loss_fn(model, batch, ctx)` under the run's autocast."""
    with ctx.autocast():
        return loss_fn(model, batch, ctx)
