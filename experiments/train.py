"""`samsuite train`: SGD and every SAM-family member compared on a testbed (`testbeds`): the embedded
digits, MNIST-1D, or a domain suite under the leave-one-domain-out protocol, with optional label noise,
over several seeds.

All optimizers train in lockstep from the same initial weights on the same batches, and their steps
are timed round-robin, so the time-per-step ratios come from one run in which machine noise hits
every optimizer alike. A run is a sequence of units, one per (held-out domain, seed) (one per seed
for the standard protocol); each unit draws its label noise, validation split, initial weights and
batch order from its seed, the same for every optimizer. Models are selected on validation data
(a seeded `val_fraction` of the training data; in leave-one-domain-out, DomainBed's training-domain
validation), never on the test data.

Results: `runs/<name>/` with `metrics.jsonl` (one record per unit, optimizer and epoch), `results.csv/.md`
(mean ± std over seeds and the paired difference to the base optimizer with its 95% interval; see
`experiments.train_results`), `lodo.csv/.md` for leave-one-domain-out, `curves.png`, `summary.json`,
and a safetensors checkpoint per epoch from which a killed run resumes exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared import BASE_OPTIMIZERS, OPTIMIZERS, Batch, Member, build_optimizer, chunk, member_backward
from shared.config import ConfigError, apply_overrides, check_finite, plain_value, to_dict
from shared.errors import Diverged
from shared.runio import RunDir, check_run_name
from shared.seeding import derive_seed
from shared.validate import check_device, check_nonnegative, check_positive, check_range

# Settings that do not change a run's numbers: a run may resume with other values.
RESUME_NEUTRAL = ("name", "out_dir", "resume", "threads", "max_loss")
PROTOCOLS = ("standard", "leave-one-domain-out", "fine-tune")
USEFUL = "+useful"  # the suffix of an arm trained on USEFUL's upsampled data
EVAL_CHUNK = 2048  # examples per forward pass when evaluating


def _default_options() -> dict[str, dict[str, Any]]:
    # Radii from the papers' CIFAR settings, scaled down for a 30k-parameter CNN: SAM 0.05,
    # ASAM 0.5 (Kwon et al.: ~10x SAM), GSAM alpha 0.1 with rho following the cosine lr down to
    # 0.005, OBF gamma 1e-12 (the reference code's ResNet setting) with sigmoid predictions.
    # SAF and MESA: the paper's lam (0.3, 0.8), tau 5, E~ 3 and start epoch 5; MESA's EMA decay
    # scaled to our run length: timm's 0.9998 over ImageNet's ~28k steps has a half-life of about
    # 12% of training, which for 30 epochs of 50 steps is beta ~0.995; its start is 5 epochs of
    # steps. TRAM-x's sigma: NOT FOUND in the paper or code; 0.1 (R3F's, the paper's baseline).
    return {
        "sam": {"rho": 0.05},
        "asam": {"rho": 0.5},
        "gsam": {"rho": 0.05, "alpha": 0.1, "rho_min": 0.005},
        "obf": {"rho": 0.05, "gamma": 1e-12},
        "saf": {"lam": 0.3, "tau": 5.0, "past": 3, "start_epoch": 5},
        "mesa": {"lam": 0.8, "tau": 5.0, "beta": 0.995, "start_step": 250},
        "tram-x": {"sigma": 0.1},
        # SAGM and GAQAT: DomainBed's SAGM defaults; GAQAT's window, interval and threshold are ours
        # (the paper publishes none; shared.sam.gaqat)
        "sagm": {"rho": 0.05, "alpha": 0.001},
        "gaqat": {"rho": 0.05, "alpha": 0.001, "window": 20, "interval": 10, "threshold": 0.3},
    }


QUANTIZE_KEYS = {"bits": None, "act_bits": None, "first_last_bits": 8, "fp_epochs": None}


@dataclass
class TrainConfig:
    """`samsuite train` settings; override any with key=value (e.g. epochs=5 options.sam.rho=0.1
    dataset=mnist1d model=cnn1d label_noise=0.2 'seeds=[0,1,2,3,4]')."""

    name: str = "train-digits"
    out_dir: str = "runs"
    # the testbed
    dataset: str = "digits"  # testbeds.DATASETS (standard protocol) or testbeds.SUITES (leave-one-domain-out)
    dataset_options: dict[str, Any] = field(default_factory=dict)  # e.g. {num_samples: 10000} for mnist1d
    data_dir: str | None = None
    protocol: Literal["standard", "leave-one-domain-out", "fine-tune"] = "standard"
    domains: list[str | int] | None = None  # leave-one-domain-out: held-out domains to run (None: all; 15 = "15")
    # fine-tune (testbeds.fine_tune_split): the base optimizer pre-trains on `pretrain_domains` (None: all but
    # the target) for `pretrain_epochs`; every optimizer then fine-tunes that model on `target_domain`; the test
    # data are the held-out parts of the other domains (TRAM's cross-domain setting)
    target_domain: str | int | None = None
    pretrain_domains: list[str | int] | None = None
    pretrain_epochs: int = 20  # 0: fine-tune the model as built (a hub model is pre-trained already)
    pretrain_lr: float | None = None  # None: lr (fine-tuning usually takes a smaller lr than pre-training); also quantize's
    # full-precision phase
    label_noise: float = 0.0  # fraction of training labels flipped (seeded per seed)
    label_noise_kind: Literal["symmetric", "asymmetric"] = "symmetric"
    val_fraction: float = 0.2  # of the training data (of each training domain), held out for model selection
    model: str = "digits-cnn"  # testbeds.MODELS
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. {width: 8} for digits-cnn
    # what is compared
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam", "asam", "gsam", "obf"])
    base: str = "sgd"
    options: dict[str, dict[str, Any]] = field(default_factory=_default_options)
    seeds: list[int] = field(default_factory=lambda: [0])
    # pairs [a, b] whose paired difference a - b (per seed, 95% interval) makes `pairs.csv/.md`, beside the differences
    # to the base optimizer; a member listed in several variants stands for its best one on validation
    compare: list[list[str]] = field(default_factory=list)
    # training
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    # USEFUL (Nguyen et al., NeurIPS 2024): every optimizer also trains, from the same initial weights, on the
    # training set with each class's slow-to-learn cluster upsampled (rows "<optimizer>+useful"; testbeds.useful)
    useful: bool = False
    useful_epoch: int | None = None  # epochs of the early model whose outputs are clustered (None: 10% of epochs)
    useful_factor: int = 2  # times each example of a slow cluster appears
    # LSQ quantization-aware training (shared.quant), e.g. quantize.bits=4: each unit's model is first trained in full
    # precision by the base optimizer for quantize.fp_epochs (None: epochs; at pretrain_lr), then every arm trains it with weights
    # and layer inputs fake-quantized to `bits` (`act_bits`: the inputs' bits, None = bits; the first and last layers
    # at `first_last_bits`, 8 as LSQ, null = full precision); empty: no quantization
    quantize: dict[str, Any] = field(default_factory=dict)
    m: int | None = None  # m-sharpness: micro-batch size of each perturbation (None: whole batch)
    grad_accum: int = 1  # micro-batches per step (e from their accumulated gradient)
    augment: bool = False  # the data set's train-time augmentation (CIFAR: random crop with padding 4 and flip)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    threads: int | None = None
    max_loss: float = 1e4  # a training loss above this (or NaN) stops the run as diverged
    resume: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        check_run_name(self.name)
        if self.domains is not None:  # domain names are strings ("15" for rotated-digits' 15 degrees)
            self.domains = [str(d) for d in self.domains]
        if self.pretrain_domains is not None:
            self.pretrain_domains = [str(d) for d in self.pretrain_domains]
        if self.target_domain is not None:
            self.target_domain = str(self.target_domain)
        self._check_testbed()
        if not self.optimizers:
            raise ConfigError("optimizers: expected at least one optimizer")
        allowed = OPTIMIZERS.names() + BASE_OPTIMIZERS.names()
        for i, label in enumerate(self.optimizers):
            name, _ = variant(label, f"optimizers[{i}]")
            if name.lower() not in allowed:
                raise ConfigError(f"optimizers[{i}]: unknown optimizer '{name}'. Allowed: {', '.join(allowed)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"optimizers: listed twice in {self.optimizers}")
        if self.base not in BASE_OPTIMIZERS:
            raise ConfigError(BASE_OPTIMIZERS.unknown_message(self.base, "base"))
        for key in self.options:
            if key not in OPTIMIZERS:
                raise ConfigError(OPTIMIZERS.unknown_message(key, f"options.{key}"))
        self._check_compare()
        if not self.seeds:
            raise ConfigError("seeds: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: listed twice in {self.seeds}")
        for key in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.m is not None and not 1 <= self.m <= self.batch_size:
            raise ConfigError(f"m: expected 1 <= m <= batch_size ({self.batch_size}), got {self.m}")
        if self.m is not None and self.grad_accum > 1:
            raise ConfigError("m, grad_accum: set one of them (m-sharpness already splits the batch)")
        if not isinstance(self.useful_factor, int) or self.useful_factor < 2:
            raise ConfigError(f"useful_factor: expected an integer >= 2, got {self.useful_factor!r}")
        if self.useful_epoch is not None and not 1 <= self.useful_epoch <= self.epochs:
            raise ConfigError(f"useful_epoch: expected 1 <= useful_epoch <= epochs ({self.epochs}), got {self.useful_epoch}")
        try:
            check_device("device", self.device)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: expected an integer >= 1 (or null: torch's choice), got {self.threads}")
        try:
            check_positive("lr", self.lr)
            if self.pretrain_lr is not None:
                check_positive("pretrain_lr", self.pretrain_lr)
            check_positive("max_loss", self.max_loss)
            check_range("momentum", self.momentum, 0.0, 1.0 - 1e-12)
            check_nonnegative("weight_decay", self.weight_decay)
            check_range("label_noise", self.label_noise, 0.0, 1.0 - 1e-12)
            check_range("val_fraction", self.val_fraction, 1e-6, 0.5)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._check_quantize()
        for label in self.optimizers:  # every optimizer's options are checked before any work
            try:
                self.optimizer(label, [torch.zeros(1, requires_grad=True)])
            except (ValueError, TypeError) as err:
                name = variant(label)[0]
                where = f"options.{name}" if name in OPTIMIZERS and label == name else f"optimizers ({label})"
                key, sep, rest = str(err).partition(": ")
                joined = sep and key.isidentifier() and where.startswith("options.")
                raise ConfigError(f"{where}.{key}: {rest}" if joined else f"{where}: {err}") from None

    def _check_compare(self) -> None:
        grids = {variant(label)[0] for label in self.optimizers
                 if sum(variant(other)[0] == variant(label)[0] for other in self.optimizers) > 1}
        allowed = [*self.arms, *sorted(grids)]
        for i, pair in enumerate(self.compare):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ConfigError(f"compare[{i}]: expected a pair [method, reference], got {pair!r}")
            for name in pair:
                if name not in allowed:
                    raise ConfigError(f"compare[{i}]: {name!r} is not trained in this run. Allowed: {', '.join(allowed)}")

    def _check_quantize(self) -> None:
        """The keys and values of `quantize` (checked by quantizing a two-layer model), and GAQAT's need of it."""
        unknown = sorted(set(self.quantize) - set(QUANTIZE_KEYS))
        if unknown:
            raise ConfigError(f"quantize.{unknown[0]}: unknown key. Allowed: {', '.join(QUANTIZE_KEYS)}")
        if self.quantize:
            if self.quantize.get("bits") is None:
                raise ConfigError("quantize.bits: expected an integer in 2..8 (the weights' bits), got none")
            fp = self.quantize.get("fp_epochs")
            if fp is not None and (not isinstance(fp, int) or fp < 0):
                raise ConfigError(f"quantize.fp_epochs: expected an integer >= 0 or null (= epochs), got {fp!r}")
            try:
                self.quantized(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
            except ValueError as err:
                raise ConfigError(f"quantize.{err}") from None
        for i, label in enumerate(self.optimizers):
            if variant(label)[0] == "gaqat" and not self.quantize:
                raise ConfigError(f"optimizers[{i}]: gaqat adapts the step sizes of a quantized model; set "
                                  "quantize.bits (e.g. quantize.bits=4), or use sagm")

    def quantized(self, model: nn.Module) -> nn.Module:
        """`model` with LSQ fake quantization as `quantize` asks (in place)."""
        from shared.quant import quantize_model

        q = {**QUANTIZE_KEYS, **self.quantize}
        return quantize_model(model, q["bits"], q["act_bits"], q["first_last_bits"])

    @property
    def fp_epochs(self) -> int:
        """Epochs of full-precision training before quantization-aware training."""
        value = self.quantize.get("fp_epochs")
        return self.epochs if value is None else value

    def _check_testbed(self) -> None:
        """Names only (no data is loaded here): the data set or suite for the protocol, the model."""
        from testbeds import DATASETS, MODELS, SUITES

        registry, what = (DATASETS, "data set") if self.protocol == "standard" else (SUITES, "domain suite")
        if self.dataset not in registry:
            other = SUITES if registry is DATASETS else DATASETS
            hint = f" ({self.dataset!r} is a {'domain suite' if registry is DATASETS else 'data set'}: set " \
                   f"protocol={'leave-one-domain-out' if registry is DATASETS else 'standard'})" \
                if self.dataset in other else ""
            raise ConfigError(f"dataset: unknown {what} {self.dataset!r} for protocol={self.protocol}{hint}. "
                              f"Allowed: {', '.join(registry.names())}")
        if self.model not in MODELS:
            raise ConfigError(MODELS.unknown_message(self.model, "model"))
        if self.domains is not None and self.protocol != "leave-one-domain-out":
            raise ConfigError("domains: only used with protocol=leave-one-domain-out")
        if (self.protocol == "fine-tune") != (self.target_domain is not None):
            raise ConfigError("target_domain: protocol=fine-tune needs it (the domain to fine-tune on); other "
                              "protocols take none")
        if self.pretrain_domains is not None and self.protocol != "fine-tune":
            raise ConfigError("pretrain_domains: only used with protocol=fine-tune")
        if not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < 0:
            raise ConfigError(f"pretrain_epochs: expected an integer >= 0 (0: the model is already pre-trained, "
                              f"e.g. a hub model), got {self.pretrain_epochs!r}")

    @functools.cached_property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def arms(self) -> list[str]:
        """What is trained side by side: every optimizer, and with `useful` each again on USEFUL's data."""
        return self.optimizers + ([f"{label}{USEFUL}" for label in self.optimizers] if self.useful else [])

    @property
    def early_epochs(self) -> int:
        """USEFUL's separating epoch t: 10% of training (the paper: 5-10%), at least one epoch."""
        return self.useful_epoch or max(1, round(0.1 * self.epochs))

    def optimizer(self, label: str, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        """Optimizer `label` (or arm `label+useful`) over `params`: its member's `options`, then the label's own."""
        name, own = variant(label.removesuffix(USEFUL))
        kwargs = {"lr": lr or self.lr, "weight_decay": self.weight_decay}
        base = self.base if name in OPTIMIZERS else name
        if "momentum" in inspect.signature(BASE_OPTIMIZERS.get(base)).parameters:  # SGD, RMSprop; not Adam(W)
            kwargs["momentum"] = self.momentum
        if name in OPTIMIZERS:
            return build_optimizer(name, params, self.base, **{**self.options.get(name, {}), **own}, **kwargs)
        return build_optimizer(name, params, **{**kwargs, **own})


def variant(label: str, field_name: str = "optimizers") -> tuple[str, dict[str, Any]]:
    """"sam" -> ("sam", {}); "sam:rho=0.1" -> ("sam", {"rho": 0.1}); "gsam:rho=0.1,alpha=0.2": several options.
    Variants of one member side by side make a hyperparameter grid whose best entry is chosen on validation
    accuracy (`experiments.train_results`), never on test accuracy."""
    name, sep, rest = str(label).partition(":")
    items = rest.split(",") if sep else []
    if any("=" not in item or not item.partition("=")[0].strip() for item in items):
        raise ConfigError(f"{field_name}: {label!r}: expected NAME or NAME:key=value[,key=value], e.g. sam:rho=0.1")
    options = plain_value(apply_overrides({}, [item.strip() for item in items]), field_name)
    return name.strip(), options


# ---------------------------------------------------------------------------------------------- data
Split = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class UnitData:
    """One unit's tensors: train (labels possibly noisy), validation (from the training data) and test."""

    fold: str | None  # the held-out domain (leave-one-domain-out), else None
    seed: int
    train: Split
    val: Split
    test: Split
    num_classes: int
    flipped: float  # the fraction of training labels the label noise flipped
    pretrain: Split | None = None  # fine-tune protocol: what the initial model is pre-trained on
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None  # train-time augmentation of a batch


class Testbed:
    """The data of a run, loaded once; `unit(fold, seed)` gives a unit's splits."""

    def __init__(self, cfg: TrainConfig) -> None:
        from testbeds import load_source, load_suite, source_tensors

        self.cfg = cfg
        if cfg.protocol == "standard":
            source = load_source(cfg.dataset, cfg.data_dir, cfg.dataset_options)
            self.num_classes = source.train.features["label"].num_classes
            self.train, self.test = source_tensors(source, "train"), source_tensors(source, "test")
            self.folds: list[str | None] = [None]
            self.suite = None
            self.augment = source.augment
        else:
            self.augment = None
            self.suite = load_suite(cfg.dataset, **cfg.dataset_options)
            self.num_classes = self.suite.num_classes
            names = list(self.suite.domains)
            for key in ("domains", "pretrain_domains", "target_domain"):
                value = getattr(cfg, key)
                unknown = [d for d in ([value] if isinstance(value, str) else value or []) if d not in names]
                if unknown:
                    raise ConfigError(f"{key}: {self.suite.name} has no domain {unknown[0]!r}. Allowed: {', '.join(names)}")
            if cfg.target_domain in (cfg.pretrain_domains or []):
                raise ConfigError(f"pretrain_domains: the target domain {cfg.target_domain!r} is fine-tuned on, "
                                  "not pre-trained on")
            self.folds = [None] if cfg.protocol == "fine-tune" else list(cfg.domains or names)
        if cfg.augment and self.augment is None:
            raise ConfigError(f"augment: {cfg.dataset!r} has no train-time augmentation (CIFAR has crop and flip); "
                              "set augment=false")

    def unit(self, fold: str | None, seed: int) -> UnitData:
        from testbeds import fine_tune_split, leave_one_domain_out, noisy_labels

        cfg = self.cfg
        pretrain = None
        if self.suite is None:
            (x, y), test = self.train, self.test
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(seed, "val")))
            n_val = max(1, round(cfg.val_fraction * len(y)))
            val, train = (x[order[:n_val]], y[order[:n_val]]), (x[order[n_val:]], y[order[n_val:]])
        elif cfg.protocol == "fine-tune":
            tune = fine_tune_split(self.suite, cfg.target_domain, pretrain_domains=cfg.pretrain_domains,
                                   holdout_fraction=cfg.val_fraction, seed=seed)
            pretrain, train, val, test = tune.pretrain, tune.train, tune.val, tune.test
        else:
            split = leave_one_domain_out(self.suite, holdout_fraction=cfg.val_fraction, seed=seed, domains=[fold])[0]
            train, val, test = split.train, split.val, split.test
        flipped = 0.0
        if cfg.label_noise > 0:  # training labels only: validation and test keep theirs
            labels, mask = noisy_labels(train[1], cfg.label_noise, cfg.label_noise_kind, self.num_classes, seed)
            train, flipped = (train[0], labels), float(mask.float().mean())
        augment = self.augment if cfg.augment else None
        return UnitData(fold, seed, train, val, test, self.num_classes, flipped, pretrain, augment)

    def units(self) -> list[tuple[str | None, int]]:
        return [(fold, seed) for fold in self.folds for seed in self.cfg.seeds]


# ---------------------------------------------------------------------------------------------- arms
@dataclass
class _Arm:
    """One optimizer being compared: its model, optimizer, scheduler and timings."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train: Split  # what it trains on: the unit's training set, or USEFUL's upsampled one
    group: str  # arms of a group train in lockstep on the same batches: "-" or "useful"


def _make_arm(name: str, cfg: TrainConfig, init: dict[str, Tensor], model_fn: Callable[[], nn.Module],
              train: Split, group: str = "-", epochs: int | None = None, lr: float | None = None) -> _Arm:
    model = model_fn().to(cfg.torch_device)
    model.load_state_dict(init)
    opt = cfg.optimizer(name, model.parameters(), lr)
    if cfg.schedule == "cosine":
        steps_total = (epochs or cfg.epochs) * math.ceil(len(train[1]) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return _Arm(name, model, opt, sched, train, group)


def _micro_batches(batch: Batch, cfg: TrainConfig) -> list[Batch]:
    if cfg.m is not None:
        return chunk(batch, cfg.m)
    return chunk(batch, math.ceil(len(batch.targets) / cfg.grad_accum))


def train_step(arm: _Arm, batch: Batch, cfg: TrainConfig) -> None:
    """One optimizer step of `arm` on `batch`: every optimizer through the one driver."""
    device = cfg.torch_device
    batch = Batch(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), batch.index)
    member_backward(arm.opt, arm.model, _micro_batches(batch, cfg), F.cross_entropy, m_sharpness=cfg.m is not None)
    arm.opt.step()
    arm.sched.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, in chunks, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_CHUNK):
        logits = model(x[start : start + EVAL_CHUNK].to(device))
        target = y[start : start + EVAL_CHUNK].to(device)
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    model.train()
    return loss / len(y), correct / len(y)


# ---------------------------------------------------------------------------------------------- the run
def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train every optimizer of `cfg` on every unit; returns the summary (also summary.json)."""
    from experiments.train_results import finish

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    bed = Testbed(cfg)
    units = bed.units()
    first = bed.unit(*units[0])  # model and options against the data, before any write
    _unit_arms(cfg, first, _unit_model(cfg, first, pretrain=False))
    with RunDir.claim(cfg.out_dir, cfg.name, "train") as run:
        config = to_dict(cfg)
        state = _resume(run, config) if cfg.resume else None
        if state is None:  # a fresh start: no stale checkpoint may be resumed from later
            run.truncate_metrics(0)
            run.remove_checkpoint()
        run.write_config(config)
        done = (state["unit"], state["epoch"]) if state else (0, 0)
        timings: dict[str, list[float]] = {name: [] for name in cfg.arms}
        if state:
            timings = {name: list(t) for name, t in state["step_times"].items()}
        progress = tqdm(total=len(units) * cfg.epochs, initial=done[0] * cfg.epochs + done[1], desc=cfg.name,
                        unit="epoch")
        notes: dict[str, dict[str, Any]] = {"flipped": {}, "useful": {}}
        if state:
            notes = {"flipped": dict(state["flipped"]), "useful": dict(state.get("useful", {}))}
        for u, (fold, seed) in enumerate(units):
            if u < done[0] or (u == done[0] and done[1] == cfg.epochs):
                continue
            data = bed.unit(fold, seed)
            notes["flipped"][f"{fold or '-'}/{seed}"] = data.flipped
            model = _unit_model(cfg, data)  # deterministic, like USEFUL's split: recomputed on resume
            useful = _useful_split(cfg, data, model) if cfg.useful else None
            if useful is not None:
                notes["useful"][f"{fold or '-'}/{seed}"] = useful[1]
            arms = _unit_arms(cfg, data, model, useful[0] if useful else None)
            start = done[1] if u == done[0] else 0
            if start:
                _load_arms(arms, state["arms"])
            _train_unit(cfg, _comparable(config), run, u, data, arms, start, timings, notes, progress)
        progress.close()
        return finish(run, cfg, config, bed, timings, notes, time.perf_counter() - started)


UnitModel = tuple[Callable[[], nn.Module], dict[str, Tensor]]  # a model factory and the initial weights


def _unit_model(cfg: TrainConfig, data: UnitData, pretrain: bool = True) -> UnitModel:
    """The unit's model factory and its initial weights: drawn from the unit's seed, then (fine-tune
    protocol, unless `pretrain` is False) pre-trained by the base optimizer on `data.pretrain` for
    `pretrain_epochs` with the run's schedule, and with `quantize` trained in full precision and
    quantized (`_quantized`); deterministic, so a resumed run redoes it exactly."""
    from testbeds import build_model

    shape = tuple(data.train[0].shape[1:])

    def model_fn() -> nn.Module:
        try:
            return build_model(cfg.model, data.num_classes, shape, **cfg.model_options)
        except ValueError as err:
            raise ConfigError(f"model {cfg.model!r}: {err}" if not str(err).startswith("model") else str(err)) from None

    torch.manual_seed(derive_seed(data.seed, "init") % 2**63)
    init = model_fn().state_dict()
    if data.pretrain is not None and pretrain and cfg.pretrain_epochs > 0:
        init = _pretrained(cfg, data, (model_fn, init), data.pretrain, "pretrain", cfg.pretrain_epochs, cfg.pretrain_lr)
    if cfg.quantize:
        return _quantized(cfg, data, (model_fn, init), pretrain)
    return model_fn, init


def _pretrained(cfg: TrainConfig, data: UnitData, model: UnitModel, train: Split, group: str, epochs: int,
                lr: float | None = None) -> dict[str, Tensor]:
    """The weights after the base optimizer trains `model` on `train` for `epochs` (the run's schedule)."""
    model_fn, init = model
    arm = _make_arm(cfg.base, cfg, init, model_fn, train, epochs=epochs, lr=lr)
    for epoch in range(epochs):
        for batch in _epoch_batches(arm.train, data, group, epoch, cfg.batch_size):
            train_step(arm, batch, cfg)
    return {k: v.detach().clone() for k, v in arm.model.state_dict().items()}


def _quantized(cfg: TrainConfig, data: UnitData, model: UnitModel, pretrain: bool = True) -> UnitModel:
    """LSQ's start: the full-precision model trained by the base optimizer for `fp_epochs` on the unit's
    training set at `pretrain_lr` (unless `pretrain` is False), then quantized, its step sizes initialised by one
    eval-mode forward of the first `batch_size` training examples (LSQ's init from the weights and
    the data; eval mode leaves batch-norm statistics as they are)."""
    model_fn, init = model
    if pretrain and cfg.fp_epochs > 0:
        init = _pretrained(cfg, data, model, data.train, "full-precision", cfg.fp_epochs, cfg.pretrain_lr)

    def quantized_fn() -> nn.Module:
        return cfg.quantized(model_fn())

    net = quantized_fn().to(cfg.torch_device)
    missing, unexpected = net.load_state_dict(init, strict=False)
    if unexpected or not all("quantizer" in key for key in missing):  # only the quantizers are new
        raise RuntimeError(f"quantize: the full-precision weights do not fit the quantized model: missing {missing}, "
                           f"unexpected {unexpected}")
    net.eval()
    with torch.no_grad():
        net(data.train[0][: cfg.batch_size].to(cfg.torch_device))
    return quantized_fn, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _unit_arms(cfg: TrainConfig, data: UnitData, model: UnitModel, useful: Split | None = None) -> list[_Arm]:
    """Every arm of the unit from the same initial weights; "+useful" arms train on `useful`."""
    model_fn, init = model
    return [_make_arm(name, cfg, init, model_fn, data.train if useful is None else useful, "useful")
            if name.endswith(USEFUL)
            else _make_arm(name, cfg, init, model_fn, data.train) for name in cfg.arms]


def _useful_split(cfg: TrainConfig, data: UnitData, model: UnitModel) -> tuple[Split, dict[str, Any]]:
    """USEFUL's training set for the unit: the base optimizer trains from the unit's initial weights
    for `early_epochs` on the unit's batches (the plain base arm's first epochs), its logits on the
    training set are clustered (`testbeds.useful_plan`), the slow clusters upsampled. Returns the
    split and its summary, with the cost in epochs relative to one plain run."""
    from testbeds import useful_plan

    model_fn, init = model
    early = _make_arm(cfg.base, cfg, init, model_fn, data.train)
    for epoch in range(cfg.early_epochs):
        for batch in _epoch_batches(early.train, data, "-", epoch, cfg.batch_size):
            train_step(early, batch, cfg)
    early.model.eval()
    with torch.no_grad():
        logits = torch.cat([early.model(x.to(cfg.torch_device)).cpu() for x in data.train[0].split(EVAL_CHUNK)])
    plan = useful_plan(logits, data.train[1], data.num_classes, cfg.useful_factor, data.seed)
    x, y = data.train
    cost = (cfg.early_epochs * len(y) + cfg.epochs * len(plan.order)) / (cfg.epochs * len(y))
    return (x[plan.order], y[plan.order]), {**plan.summary, "early_epochs": cfg.early_epochs,
                                            "epochs_vs_plain_run": round(cost, 4)}


def _epoch_batches(train: Split, data: UnitData, group: str, epoch: int, batch_size: int) -> Iterator[Batch]:
    """An epoch's batches of `train`, shuffled (and augmented) from (seed, held-out domain, group,
    epoch); each batch carries its examples' positions in `train`."""
    parts = (data.seed, data.fold or "-", epoch) if group == "-" else (data.seed, data.fold or "-", group, epoch)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(derive_seed(*parts)))
    gen = torch.Generator().manual_seed(derive_seed(*parts, "augment"))
    for idx in order.split(batch_size):
        x = train[0][idx]
        yield Batch(x if data.augment is None else data.augment(x, gen), train[1][idx], idx)


def _train_unit(cfg: TrainConfig, comparable: dict[str, Any], run: RunDir, u: int, data: UnitData, arms: list[_Arm],
                start: int, timings: dict[str, list[float]], notes: dict[str, dict[str, Any]], progress: tqdm) -> None:
    groups: dict[str, list[_Arm]] = {}
    for arm in arms:
        groups.setdefault(arm.group, []).append(arm)
    for epoch in range(start, cfg.epochs):
        for group, members in groups.items():
            for batch in _epoch_batches(members[0].train, data, group, epoch, cfg.batch_size):
                for arm in members:  # round-robin: every optimizer of a group sees the same batch and noise
                    t0 = time.perf_counter()
                    train_step(arm, batch, cfg)
                    timings[arm.name].append(time.perf_counter() - t0)
        records = [_epoch_record(arm, epoch, data) for arm in arms]
        for record in records:
            if not (math.isfinite(record["train_loss"]) and record["train_loss"] <= cfg.max_loss):
                progress.close()
                saved = f"unit {u + 1}, epoch {epoch}" if epoch else (f"unit {u}, epoch {cfg.epochs}" if u else None)
                where = f"epoch {epoch + 1}, optimizer {record['optimizer']}"
                if data.fold is not None or len(cfg.seeds) > 1:
                    where = f"unit {u + 1} (held out {data.fold or '-'}, seed {data.seed}), {where}"
                raise Diverged(where, f"training loss {record['train_loss']:.4g}, limit max_loss={cfg.max_loss:g}",
                               run.path / "checkpoint.safetensors" if saved else None, saved,
                               "Lower lr (or that optimizer's rho in options), or raise max_loss; the same "
                               f"command{' resumes from it' if saved else ' starts over'}.")
            run.log(record)
        progress.set_postfix({r["optimizer"]: f"{r['val_acc']:.3f}" for r in records})
        progress.update()
        run.save_checkpoint({"unit": u, "epoch": epoch + 1, "config": comparable,
                             "arms": {arm.name: _arm_state(arm) for arm in arms}, "step_times": timings,
                             "flipped": notes["flipped"], "useful": notes["useful"]})


def _epoch_record(arm: _Arm, epoch: int, data: UnitData) -> dict[str, Any]:
    record: dict[str, Any] = {"fold": data.fold, "seed": data.seed, "optimizer": arm.name, "epoch": epoch + 1}
    for split in ("train", "val", "test"):
        loss, acc = evaluate(arm.model, *getattr(data, split))
        record.update({f"{split}_loss": loss, f"{split}_acc": acc})
    record["lr"] = arm.sched.get_last_lr()[0]
    if isinstance(arm.opt, Member):
        record.update(arm.opt.metrics())
    return record


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_NEUTRAL}


def _arm_state(arm: _Arm) -> dict[str, Any]:
    return {"model": arm.model.state_dict(), "opt": arm.opt.state_dict(), "sched": arm.sched.state_dict()}


def _load_arms(arms: list[_Arm], saved: dict[str, Any]) -> None:
    for arm in arms:
        arm.model.load_state_dict(saved[arm.name]["model"])
        arm.opt.load_state_dict(saved[arm.name]["opt"])
        arm.sched.load_state_dict(saved[arm.name]["sched"])


def _resume(run: RunDir, config: dict[str, Any]) -> dict[str, Any] | None:
    """The last checkpoint of an identical config (None: start from the beginning)."""

    def check(state: dict[str, Any]) -> None:
        if state["config"] != _comparable(config):
            raise ConfigError(f"{run.path}: holds a run with a different config; choose another name= or set "
                              "resume=false")

    return run.load_checkpoint(check=check)
