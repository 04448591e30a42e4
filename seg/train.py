"""`samsuite seg run`: UU-Mamba (U-Mamba + SAM + the uncertainty-aware loss) against its ablations on
the synthetic cardiac slices (in-domain and shifted test domains) or ACDC, over several seeds.

A run trains each arm (`ARMS`: a network, an optimizer and a loss) for each seed, one after the
other. Arms that share a network start from the same initial weights and see the same batches in
the same order (both drawn from the seed). The model of each arm and seed is selected on the
validation split, by the foreground Dice after each epoch, and only that model is tested.

Training follows the reference (`nnUNetTrainerUMambaEnc`, SEED_METHODS.md 6c) without its defects:
- SGD with Nesterov momentum 0.99, weight decay 3e-5, polynomial lr decay (exponent 0.9) stepped per
  epoch; SAM with rho 0.05 over it; gradients of the network clipped to norm 12 before the base step.
- The loss weights s_k are in the optimizer (the reference builds a second loss whose weights no
  optimizer sees), with weight decay 0, and are excluded from SAM's perturbation (`perturb: False`):
  e probes the network's loss surface, while perturbing s_k only rescales the terms, and three
  scalars would share the radius with the whole network (the reference perturbs them).
- Mixed precision (CUDA, `amp`): one GradScaler drives both passes and its `step` skips a step whose
  gradients overflowed; SAM restores the weights bit for bit first (the reference's `second_step`
  bypasses the scaler's check and applies overflowed steps).

Results in `runs/<name>/`: `metrics.jsonl` (one record per arm, seed and epoch; one "test" record per
arm and seed), `results.csv/.md` (mean ± std over seeds of per-class Dice and HD95 on each test
domain), `pairs.csv/.md` (the reference arm minus each other arm, paired over seeds, with 95%
intervals), `curves.png`, `overlays/*.png`, `summary.json`, and a checkpoint after every epoch
from which a killed run resumes exactly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from seg.losses import LOSS_TERMS, DeepSupervisionLoss, UncertaintyLoss
from seg.models import build_seg_model
from seg.synthetic import CLASSES
from shared import Batch, build_optimizer, member_backward
from shared.config import ConfigError, check_finite, to_dict
from shared.runio import RunDir, check_run_name
from shared.seeding import derive_seed
from shared.validate import check_device, check_int, check_nonnegative, check_positive, check_range

RESUME_NEUTRAL = ("name", "out_dir", "resume", "threads", "overlays")
EVAL_BATCH = 32  # slices per forward pass when evaluating


@dataclass(frozen=True)
class Arm:
    """One contender: its network, its optimizer (a SAM-family member or a base optimizer) and its loss."""

    model: str
    optimizer: str
    terms: tuple[str, ...]
    weighted: bool
    description: str


#: The issue's comparison: UU-Mamba and the three ablations. A new arm is one entry here.
ARMS: dict[str, Arm] = {
    "uu-mamba": Arm("umamba", "sam", LOSS_TERMS, True, "U-Mamba-Enc, SAM, uncertainty-weighted Dice + CE + focal"),
    "unet": Arm("unet", "sgd", ("dice", "ce"), False, "U-Net, SGD, Dice + CE (nnU-Net's loss)"),
    "umamba-sgd": Arm("umamba", "sgd", LOSS_TERMS, True, "U-Mamba-Enc without SAM"),
    "umamba-unweighted": Arm("umamba", "sam", LOSS_TERMS, False, "U-Mamba-Enc, SAM, Dice + CE + focal summed"),
}


@dataclass
class SegConfig:
    """`samsuite seg run` settings; override any with key=value (e.g. epochs=5 'arms=[uu-mamba,unet]'
    'seeds=[0,1,2]' data=acdc data_dir=/data/Dataset027_ACDC). Defaults: the CPU demo (a few minutes on 2 cores)."""

    name: str = "seg-synthetic"
    out_dir: str = "runs"
    data: Literal["synthetic", "acdc"] = "synthetic"
    data_dir: str | None = None  # acdc: the nnU-Net raw folder (Dataset027_ACDC)
    data_seed: int = 0  # the synthetic slices (or the ACDC patient split): the same for every seed
    size: int = 32  # slices are size x size
    n_train: int = 160  # synthetic slices (acdc: patients are split by val_fraction / test_fraction)
    n_val: int = 40
    n_test: int = 80
    val_fraction: float = 0.2  # acdc: of the training patients
    test_fraction: float = 0.2
    arms: list[str] = field(default_factory=lambda: ["uu-mamba", "unet"])
    reference: str | None = "uu-mamba"  # pairs.csv: this arm minus each other arm, paired over seeds
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    rho: float = 0.05
    grad_clip: float | None = 12.0
    base_channels: int = 16
    depth: int = 4
    deep_supervision: bool = False
    amp: bool | None = None  # None: on for CUDA
    device: str = "auto"
    threads: int | None = None
    overlays: int = 6  # slices per overlay picture (0: none)
    resume: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        check_run_name(self.name)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            problem = f"unknown arm {unknown[0]!r}" if unknown else "expected distinct arms, at least one"
            raise ConfigError(f"arms: {problem}. Allowed: {', '.join(ARMS)}")
        if self.reference is not None and self.reference not in self.arms:
            raise ConfigError(f"reference: {self.reference!r} is not one of the arms ({', '.join(self.arms)}) or null")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct integers, at least one, got {self.seeds}")
        for key in ("epochs", "batch_size", "size", "n_train", "n_val", "n_test", "base_channels"):
            _int(key, getattr(self, key), 1)
        _int("depth", self.depth, 2)
        _int("overlays", self.overlays, 0)
        if self.threads is not None:
            _int("threads", self.threads, 1)
        factor = 2 ** (self.depth - 1)
        if self.size % factor:
            raise ConfigError(f"size: expected a multiple of {factor} (depth {self.depth} halves it {self.depth - 1} "
                              f"times), got {self.size}")
        if self.data == "acdc" and self.data_dir is None:
            raise ConfigError("data_dir: data=acdc needs the nnU-Net raw folder (e.g. /data/Dataset027_ACDC)")
        try:
            for key in ("lr", "rho"):
                check_positive(key, getattr(self, key))
            if self.grad_clip is not None:
                check_positive("grad_clip", self.grad_clip)
            check_nonnegative("weight_decay", self.weight_decay)
            check_nonnegative("poly_power", self.poly_power)
            check_range("momentum", self.momentum, 0.0, 1.0 - 1e-12)
            check_range("val_fraction", self.val_fraction, 0.0, 1.0)
            check_range("test_fraction", self.test_fraction, 0.0, 1.0)
            check_device("device", self.device)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"val_fraction, test_fraction: their sum must be below 1, got "
                              f"{self.val_fraction + self.test_fraction:g}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def use_amp(self) -> bool:
        return self.torch_device.type == "cuda" if self.amp is None else self.amp


def _int(key: str, value: Any, low: int) -> None:
    check_int(key, value, low, ConfigError)


Split = tuple[Tensor, Tensor]  # images (n, 1, H, W) float32, labels (n, H, W) int64


def load_splits(cfg: SegConfig) -> tuple[dict[str, Split], dict[str, np.ndarray | None]]:
    """train, val, test (and, on the synthetic data, test_shifted: the same hearts seen by another
    scanner) as tensors, and each split's pixel size in mm (ACDC, per slice, for HD95 in mm; None
    for the synthetic slices, whose HD95 is in pixels). ACDC is split by patient, never by slice."""
    spacing: dict[str, np.ndarray | None] = {}
    if cfg.data == "synthetic":
        from seg.synthetic import make_split

        arrays = make_split(cfg.n_train, cfg.n_val, cfg.n_test, size=cfg.size, seed=cfg.data_seed)
        spacing = dict.fromkeys(arrays)
    else:
        from seg.acdc import load_slices, open_acdc, split_cases

        dataset = open_acdc(str(cfg.data_dir))
        cases = split_cases(dataset.training, cfg.val_fraction, cfg.test_fraction, seed=cfg.data_seed)
        arrays = {}
        for key, names in cases.items():
            slices = load_slices(dataset, names, size=cfg.size)
            arrays[key], spacing[key] = (slices.images, slices.labels), slices.spacing
    splits = {}
    for key, (images, labels) in arrays.items():
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
        if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
            raise ValueError(f"{key}: images {tuple(images.shape)} and labels {tuple(labels.shape)} differ in shape")
        outside = labels[(labels < 0) | (labels >= len(CLASSES))]
        if len(outside):
            raise ValueError(f"{key}: label value {int(outside[0])} outside the classes 0..{len(CLASSES) - 1}")
        if not len(labels):
            raise ConfigError(f"{key}: the split holds no slices; raise its size (n_{key}, or the fractions)")
        splits[key] = (images, labels)
    return splits, spacing


class Contender:
    """One arm for one seed: network, loss, optimizer, schedule, scaler; and its best-on-validation state."""

    def __init__(self, cfg: SegConfig, arm_name: str, seed: int) -> None:
        self.cfg, self.name, self.seed = cfg, arm_name, seed
        arm = ARMS[arm_name]
        device = cfg.torch_device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "seg-init", arm.model))  # the same for arms sharing a network
            options: dict[str, Any] = {"base_channels": cfg.base_channels, "depth": cfg.depth,
                                       "deep_supervision": cfg.deep_supervision}
            if arm.model == "umamba":
                options["image_size"] = (cfg.size, cfg.size)
            self.model = build_seg_model(arm.model, 1, len(CLASSES), **options).to(device)
        self.weighting = UncertaintyLoss(arm.terms, arm.weighted).to(device)  # holds the s_k
        self.loss = DeepSupervisionLoss(self.weighting, cfg.depth - 1) if cfg.deep_supervision else self.weighting
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        if arm.weighted:  # the s_k: trained, without weight decay, never perturbed
            groups.append({"params": list(self.loss.parameters()), "weight_decay": 0.0, "perturb": False})
        kwargs: dict[str, Any] = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": True,
                                  "weight_decay": cfg.weight_decay}
        if arm.optimizer == "sgd":
            self.opt = build_optimizer("sgd", groups, **kwargs)
        else:
            self.opt = build_optimizer(arm.optimizer, groups, "sgd", rho=cfg.rho, **kwargs)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda epoch: (1 - epoch / cfg.epochs) ** cfg.poly_power)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.use_amp)
        self.best_dice = -math.inf
        self.best_epoch = 0
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.step_times: list[float] = []  # seconds per step, this epoch's
        self.step_s: list[float] = []  # each epoch's median step time

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One training step on (x, y); returns the loss at w and its terms."""
        t0 = time.perf_counter()
        device = self.cfg.torch_device
        terms: dict[str, Tensor] = {}

        def criterion(logits: Any, target: Tensor) -> Tensor:
            values = self.loss.term_losses(logits, target)
            if not terms:  # the first pass, at w
                terms.update({k: v.detach() for k, v in values.items()})
            return self.weighting.combine(values)

        with torch.autocast(device.type, dtype=torch.float16, enabled=self.cfg.use_amp):
            losses = member_backward(self.opt, self.model, [Batch(x, y)], criterion, scaler=self.scaler)
        self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_times.append(time.perf_counter() - t0)
        return {"loss": float(losses.loss), **{k: float(v) for k, v in terms.items()}}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(), "opt": self.opt.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "best_dice": self.best_dice, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "step_s": self.step_s}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.opt.load_state_dict(state["opt"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_dice, self.best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.step_s = [float(t) for t in state["step_s"]]


def batches(train: Split, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled mini-batches (the last may be smaller), drawn from (seed, epoch), with a
    random flip of each slice (the same for every arm)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "seg-batches", epoch))
    images, labels = train
    order = torch.randperm(len(labels), generator=gen)
    flips = torch.rand(len(labels), 2, generator=gen) < 0.5
    for idx in order.split(batch_size):
        x, y = images[idx].clone(), labels[idx].clone()
        for axis in (0, 1):
            chosen = flips[idx, axis]
            x[chosen] = x[chosen].flip(-1 - axis)
            y[chosen] = y[chosen].flip(-1 - axis)
        yield x, y


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """Label maps (n, H, W) predicted in eval mode, in chunks."""
    model.eval()
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        logits = model(images[start : start + EVAL_BATCH].to(device))
        if isinstance(logits, list):  # deep supervision: the full-resolution output
            logits = logits[0]
        out.append(logits.argmax(1).cpu())
    model.train()
    return torch.cat(out) if out else torch.zeros(0, *images.shape[2:], dtype=torch.long)


def run_seg(cfg: SegConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train and test every arm for every seed of `cfg` (resuming where a killed run stopped);
    writes the results and returns the summary."""
    from seg.report import finish

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    splits, spacing = load_splits(cfg)  # bad data fails here, before any folder is touched
    units = [(seed, arm) for seed in cfg.seeds for arm in cfg.arms]
    with RunDir.claim(cfg.out_dir, cfg.name, "seg") as run:
        config = to_dict(cfg)
        comparable = {k: v for k, v in config.items() if k not in RESUME_NEUTRAL}
        state = _resume(run, comparable) if cfg.resume else None
        if state is None:
            run.truncate_metrics(0)
            run.remove_checkpoint()
        run.write_config(config)
        done_unit, done_epoch = (int(state["unit"]), int(state["epoch"])) if state else (0, 0)
        bar = tqdm(total=len(units) * cfg.epochs, initial=done_unit * cfg.epochs + done_epoch, desc=cfg.name,
                   unit="epoch", disable=not progress)
        for u, (seed, arm) in enumerate(units):
            if u < done_unit:
                continue
            contender = Contender(cfg, arm, seed)
            start = 0
            if u == done_unit and state is not None and "contender" in state:
                contender.load(state["contender"])
                start = done_epoch
            _train(cfg, run, comparable, u, contender, splits, spacing, start, bar)
        bar.close()
        return finish(run, cfg, config, splits, time.perf_counter() - started)


def _train(cfg: SegConfig, run: RunDir, comparable: dict[str, Any], u: int, contender: Contender,
           splits: dict[str, Split], spacing: dict[str, np.ndarray | None], start: int, bar: tqdm) -> None:
    """Epochs `start`.. of one contender, a record and a checkpoint after each; then its test records."""
    from seg.metrics import dice_per_class

    device = cfg.torch_device
    val_images, val_labels = splits["val"]
    for epoch in range(start, cfg.epochs):
        sums: dict[str, float] = {}
        count = 0
        contender.step_times = []
        for x, y in batches(splits["train"], cfg.batch_size, contender.seed, epoch):
            values = contender.step(x.to(device), y.to(device))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            count += len(y)
        contender.schedule.step()
        val_dice = _mean_dice(dice_per_class(predict(contender.model, val_images, device), val_labels, len(CLASSES)))
        if not all(math.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"{contender.name}, seed {contender.seed}, epoch {epoch + 1}: the training loss "
                                     "is not finite; lower lr (or rho)")
        if val_dice > contender.best_dice:
            contender.best_dice, contender.best_epoch = val_dice, epoch + 1
            contender.best_state = copy.deepcopy(contender.model.state_dict())
        record = {"kind": "epoch", "arm": contender.name, "seed": contender.seed, "epoch": epoch + 1,
                  "lr": contender.opt.param_groups[0]["lr"], **{f"train_{k}": v / count for k, v in sums.items()},
                  "val_dice_mean": val_dice, **{f"sigma_{k}": v for k, v in contender.weighting.sigma_values().items()},
                  "step_s": float(np.median(contender.step_times))}
        contender.step_s.append(record["step_s"])
        run.log(record)
        bar.set_postfix({"arm": contender.name, "seed": contender.seed, "val_dice": f"{val_dice:.3f}"})
        bar.update()
        last = epoch + 1 == cfg.epochs
        if not last:
            run.save_checkpoint({"config": comparable, "unit": u, "epoch": epoch + 1, "contender": contender.state()})
    _test(cfg, run, contender, splits, spacing)
    run.save_checkpoint({"config": comparable, "unit": u + 1, "epoch": 0})


def _mean_dice(dice: np.ndarray) -> float:
    """The foreground Dice of (images, classes) scores: per-class means over the images where the class
    shows (NaN left out), then their mean, as `seg.metrics.segmentation_metrics` reports it."""
    per_class = [float(np.nanmean(c)) for c in dice.T if not np.isnan(c).all()]
    return float(np.mean(per_class)) if per_class else 0.0


def _test(cfg: SegConfig, run: RunDir, contender: Contender, splits: dict[str, Split],
          spacing: dict[str, np.ndarray | None]) -> None:
    """The best-on-validation model on every test domain: per-class Dice and HD95, one record each;
    overlays for the first seed."""
    from seg.metrics import segmentation_metrics
    from seg.overlay import save_overlays

    model = contender.model
    model.load_state_dict(contender.best_state)  # selected on validation, never on test
    for domain in [key for key in splits if key.startswith("test")]:
        images, labels = splits[domain]
        pred = predict(model, images, cfg.torch_device)
        metrics = segmentation_metrics(pred, labels, len(CLASSES), spacing[domain])
        run.log({"kind": "test", "arm": contender.name, "seed": contender.seed, "domain": domain,
                 "best_epoch": contender.best_epoch, "val_dice_mean": contender.best_dice, **metrics,
                 "step_s": float(np.median(contender.step_s))})
        if cfg.overlays and contender.seed == cfg.seeds[0]:  # evenly spaced test slices
            save_overlays(run.path / "overlays" / f"{contender.name}-{domain}.png", images.numpy(), labels.numpy(),
                          pred.numpy(), max_rows=cfg.overlays)


def _resume(run: RunDir, comparable: dict[str, Any]) -> dict[str, Any] | None:
    def check(state: dict[str, Any]) -> None:
        if state["config"] != comparable:
            raise ConfigError(f"{run.path}: holds a run with a different config; choose another name= or set "
                              "resume=false")

    return run.load_checkpoint(check=check)


__all__ = ["ARMS", "Arm", "Contender", "SegConfig", "load_splits", "run_seg"]
