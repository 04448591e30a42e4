"""`samsuite bench optim`: the cost of one SAM-family step relative to one base-optimizer step.

A step includes its forward and backward passes: SGD (momentum 0.9) takes one of each, every SAM
member two; SAF one of each (its cost is the trajectory term and the host buffer), MESA one more
forward without gradient (its EMA model), TRAM two of each and one more forward. Each member
declares them (`Member.passes`) and the bench times those passes alone, with one base step and
nothing else, as the member's floor (`two_passes`, `one_pass+1_forward`, `two_passes+1_forward`):
the issues' nominal floors (2, 4/3, 7/3) assume a backward costs two forwards, which a model whose
first layer needs no input gradient (the digits CNN) does not satisfy. `over_floor` is what a
member adds on top of its floor: perturbation, restore, gradient norm, its own terms, Python per
tensor. Beside them, `sgd+trajectory_loss`: the SGD step with SAF's and MESA's KL term against a
constant target, what either costs before its own bookkeeping; `sgd+lsq_w4a4`: the SGD step on the model
fake-quantized by LSQ at 4 bits (`shared.quant`), the overhead quantization-aware training adds. Two models: the digits
CNN (few, large tensors), the MNIST-1D CNN of the testbeds, and a deep MLP with 102 parameter
tensors, where per-tensor overhead shows. Members that keep state of their own (SAF's buffer,
MESA's and TRAM's model copies) report its size in bytes. Besides our members under both user-facing drivers, it times `pytorch_optimizer`'s SAM
(when installed) and a plain per-parameter-loop SAM in the style of davda54/sam, the floor to beat.

Timing: every candidate trains its own copy of the same model on the same batch; after a warm-up
the candidates run round-robin (the order rotated each round) so that drift of a noisy machine
hits all alike, and ratio = median step time / median base step time, all from one run. Next to
it, the median and interquartile range of the per-round ratios (step / base step of the same
round), which drift affects least. Targets are recorded with whether they are met; a missed
target is reported, never raised.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from experiments.bench import console as bench_console
from shared import OPTIMIZERS, Batch, build_optimizer, member_backward, sam_backward
from shared.models import DeepMLP, DigitsCNN
from shared.report import markdown_table
from shared.runio import atomic_write_text, environment, write_json
from shared.sam import trajectory_loss
from shared.sam.bn import frozen_bn_stats
from shared.threads import torch_threads
from testbeds.models import build_model as build_testbed_model

BATCH_SIZE = 128
NUM_CLASSES = 10
LR = 0.01
MOMENTUM = 0.9
RHO = 0.05  # pytorch_optimizer's and the loop SAM's radius; our members keep their own defaults
BASE = "sgd"
DRIVERS = ("steps", "sam_backward", "member_backward")  # driver-only members: member_backward alone
PTO = "pytorch_optimizer.SAM"
LOOP = "loop_sam"
TERM = "sgd+trajectory_loss"  # the base step plus SAF's/MESA's KL term against a fixed target: no bookkeeping
QUANT = "sgd+lsq_w4a4"  # the base step on the model fake-quantized by LSQ at 4 bits: the fake-quant overhead
PASS_WORDS = {1: "one_pass", 2: "two_passes"}


def floor_name(passes: tuple[int, int]) -> str:
    """The floor candidate of a member with these `Member.passes`: 'two_passes', 'two_passes+1_forward', ..."""
    backwards, forwards = passes
    return PASS_WORDS[backwards] + (f"+{forwards}_forward" if forwards else "")


#: (model, member) -> the largest ratio to the base step that meets the target (issue text).
RATIO_TARGETS: dict[tuple[str, str], float] = {
    ("cnn", "sam"): 2.05,
    ("cnn", "asam"): 2.05,
    ("cnn", "gsam"): 2.15,
    ("cnn", "obf"): 2.15,
    ("mlp", "sam"): 2.2,
    # issue 12: SAF at SGD's cost, MESA one extra forward (floor 4/3), TRAM 3F/2B (floor 7/3)
    **{(model, member): bound for model in ("cnn", "cnn1d")
       for member, bound in (("saf", 1.05), ("mesa", 1.40), ("tram-prev", 2.45), ("tram-init", 2.45),
                             ("tram-x", 2.45))},
    # issue 18: SAGM, two passes and the average of both gradients
    ("cnn", "sagm"): 2.1,
    ("cnn1d", "sagm"): 2.1,
}
#: Our SAM must be no slower than these, on every model.
BEAT = (PTO, LOOP)

#: Settings of a full run and of a quick one (a few seconds, for the tests).
FULL = {"warmup": 10, "rounds": 200, "inner": 1}
QUICK = {"warmup": 1, "rounds": 7, "inner": 1}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


MODELS = (
    ModelSpec("cnn", lambda: DigitsCNN(num_classes=NUM_CLASSES), (BATCH_SIZE, 1, 8, 8), "DigitsCNN(num_classes=10)"),
    ModelSpec("cnn1d", lambda: build_testbed_model("cnn1d", NUM_CLASSES, (1, 40)), (BATCH_SIZE, 1, 40),
              "testbeds cnn1d (MNIST-1D ConvBase, 25 channels)"),
    ModelSpec("mlp", lambda: DeepMLP(in_features=64, num_classes=NUM_CLASSES), (BATCH_SIZE, 64), "DeepMLP(in_features=64)"),
)


class LoopSAM(torch.optim.Optimizer):
    """SAM written the plain way (davda54/sam): one Python iteration and a few kernels per
    parameter, e kept in the state and subtracted again. The floor our foreach SAM must beat."""

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = RHO, **kwargs: Any) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for group in self.param_groups for p in group["params"] if p.grad is not None]),
            p=2,
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale
                p.add_(e)
                self.state[p]["e"] = e
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "e" in self.state[p]:
                    p.sub_(self.state[p].pop("e"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


@dataclass
class Candidate:
    member: str  # "sgd", a member of shared.OPTIMIZERS, PTO, LOOP, TERM, QUANT or a floor (`floor_name`)
    driver: str  # "base", "steps" (first_step/second_step), "sam_backward" or "member_backward" (+ opt.step()), "floor"
    model: nn.Module
    step: Callable[[], None]
    opt: Any = None

    @property
    def key(self) -> str:
        return f"{self.member}/{self.driver}"


def _base_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _term_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The base step with the trajectory loss against a constant target: what SAF costs before its
    buffer's bookkeeping, and MESA before its teacher, written the plain autograd way."""
    past = torch.randn(len(y), NUM_CLASSES, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad()
        logits = model(x)
        (F.cross_entropy(logits, y) + 0.3 * trajectory_loss(logits, past, 5.0)).backward()
        opt.step()

    return step


def _quantized_step(model: nn.Module, x: Tensor, y: Tensor, base_kwargs: dict[str, Any]) -> Callable[[], None]:
    """The base step on `model` quantized in place at W4A4 (first and last layers at 8 bits, as LSQ),
    its step sizes initialised on the batch: what quantization-aware training adds to any member."""
    from shared.quant import quantize_model

    quantize_model(model, bits=4)
    with torch.no_grad():
        model.eval()(x)
    model.train()
    return _base_step(model, build_optimizer(BASE, model.parameters(), **base_kwargs), x, y)


def _floor_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, passes: tuple[int, int]
                ) -> Callable[[], None]:
    """What any method with these passes must pay: its forward-backward passes, its forwards
    without gradient (batch-norm statistics left as they are) and the base step, nothing else."""
    backwards, forwards = passes

    def step() -> None:
        for _ in range(backwards):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        with torch.no_grad(), frozen_bn_stats(model):
            for _ in range(forwards):
                model(x)
        opt.step()
        opt.zero_grad()

    return step


def _two_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The manual API: ascent pass, first_step, descent pass at w + e, second_step."""
    ascent_loss = getattr(opt, "ascent_loss", None)

    def step() -> None:
        logits = model(x)
        (ascent_loss(logits, y) if ascent_loss is not None else F.cross_entropy(logits, y)).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return step


def _driver_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The driver: `sam_backward` leaves the SAM gradient in .grad, then the base step."""
    batches = [(x, y)]
    ascent = None
    if opt.ascent_loss is not None:
        ascent = lambda b: opt.ascent_loss(model(b[0]), b[1])

    def descent(b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    def step() -> None:
        sam_backward(opt, batches, descent, ascent=ascent, model=model)
        opt.step()

    return step


def _member_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The contract every loop uses: `member_backward` (the same batch each step, its examples'
    indices with it), then the base step."""
    batches = [Batch(x, y, torch.arange(len(y)))]

    def step() -> None:
        member_backward(opt, model, batches, F.cross_entropy)
        opt.step()

    return step


def _member_order() -> list[str]:
    """SAM first (the targets compare it with the baselines), then the other members."""
    names = OPTIMIZERS.names()
    return sorted(names, key=lambda n: (n != "sam", n))


def _passes(member: str) -> tuple[int, int]:
    """`Member.passes` of a member; the baselines SAMs take two passes, the base step one."""
    if member in OPTIMIZERS:
        return OPTIMIZERS.get(member).passes
    floors = {floor_name(p): p for p in _floor_passes()}
    return floors.get(member, (1, 0) if member in (BASE, TERM, QUANT) else (2, 0))


def _floor_passes() -> list[tuple[int, int]]:
    """The passes of every member, two passes first; one pass is the base step itself."""
    return sorted({(2, 0)} | {OPTIMIZERS.get(n).passes for n in OPTIMIZERS.names()} - {(1, 0)})


def _pytorch_optimizer_sam() -> tuple[type[torch.optim.Optimizer] | None, str | None]:
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        return None, None
    try:
        version = importlib.metadata.version("pytorch_optimizer")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return SAM, version


def _candidates(spec: ModelSpec, seed: int) -> list[Candidate]:
    torch.manual_seed(seed)
    reference = spec.build()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (spec.input_shape[0],), generator=gen)
    base_kwargs = {"lr": LR, "momentum": MOMENTUM}
    out: list[Candidate] = []

    def add(member: str, driver: str, make: Callable[[nn.Module], Any], opt: Callable[[nn.Module], Any] | None = None
            ) -> None:
        model = copy.deepcopy(reference).train()
        if opt is None:
            out.append(Candidate(member, driver, model, make(model)))
        else:
            built = opt(model)
            out.append(Candidate(member, driver, model, make(model, built), built))

    add(BASE, "base", lambda m: _base_step(m, build_optimizer(BASE, m.parameters(), **base_kwargs), x, y))
    for passes in _floor_passes():
        add(floor_name(passes), "floor",
            lambda m, p=passes: _floor_step(m, build_optimizer(BASE, m.parameters(), **base_kwargs), x, y, p))
    drivers = {"steps": _two_step, "sam_backward": _driver_step, "member_backward": _member_step}
    for name in _member_order():
        for driver in ("member_backward",) if OPTIMIZERS.get(name).driver_only else DRIVERS:
            add(name, driver, lambda m, o, d=drivers[driver]: d(m, o, x, y),
                lambda m, n=name: build_optimizer(n, m.parameters(), BASE, **base_kwargs))
    pto_sam, _ = _pytorch_optimizer_sam()
    if pto_sam is not None:
        add(PTO, "steps", lambda m: _two_step(m, pto_sam(m.parameters(), torch.optim.SGD, rho=RHO, **base_kwargs), x, y))
    add(LOOP, "steps", lambda m: _two_step(m, LoopSAM(m.parameters(), torch.optim.SGD, rho=RHO, **base_kwargs), x, y))
    add(TERM, "base", lambda m: _term_step(m, build_optimizer(BASE, m.parameters(), **base_kwargs), x, y))
    add(QUANT, "base", lambda m: _quantized_step(m, x, y, base_kwargs))
    return out


def _time_round_robin(candidates: list[Candidate], warmup: int, rounds: int, inner: int) -> dict[str, list[float]]:
    """Per-step seconds of each candidate, one sample per round; rounds interleave all candidates."""
    for cand in candidates:
        for _ in range(warmup):
            cand.step()
    times: dict[str, list[float]] = {c.key: [] for c in candidates}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(candidates)  # rotate: nobody always runs first or after the same neighbour
            for cand in candidates[k:] + candidates[:k]:
                t0 = time.perf_counter()
                for _ in range(inner):
                    cand.step()
                times[cand.key].append((time.perf_counter() - t0) / inner)
    finally:
        if gc_enabled:
            gc.enable()
    return times


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _state_bytes(opt: Any) -> int:
    """Bytes of the tensors a member keeps beyond the base optimizer (its `member_state`)."""
    if not hasattr(opt, "member_state"):
        return 0

    def size(value: Any) -> int:
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        return sum(size(v) for v in value.values()) if isinstance(value, dict) else 0

    return size(opt.member_state())


def _bench_model(spec: ModelSpec, seed: int, settings: dict[str, int]) -> dict[str, Any]:
    candidates = _candidates(spec, seed)
    times = _time_round_robin(candidates, **settings)
    base_key = f"{BASE}/base"
    base_median = statistics.median(times[base_key])
    floors = {(1, 0): 1.0} | {p: statistics.median(times[f"{floor_name(p)}/floor"]) / base_median
                              for p in _floor_passes()}
    optimizers: dict[str, dict[str, dict[str, Any]]] = {}
    for cand in candidates:
        samples = times[cand.key]
        paired = [t / b for t, b in zip(samples, times[base_key])]
        ratio = statistics.median(samples) / base_median
        passes = _passes(cand.member)
        optimizers.setdefault(cand.member, {})[cand.driver] = {
            "ratio": ratio,
            "floor": floor_name(passes) if passes != (1, 0) else BASE,
            "over_floor": ratio - floors[passes],
            "paired_ratio": statistics.median(paired),
            "paired_ratio_q25": _quantile(paired, 0.25),
            "paired_ratio_q75": _quantile(paired, 0.75),
            "median_step_s": statistics.median(samples),
            "samples": len(samples),
            "params_finite": _finite(cand.model),
            "member_state_bytes": _state_bytes(cand.opt),
        }
    reference = candidates[0].model
    return {
        "description": spec.description,
        "input_shape": list(spec.input_shape),
        "parameter_tensors": sum(1 for _ in reference.parameters()),
        "parameters": sum(p.numel() for p in reference.parameters()),
        "base": BASE,
        "optimizers": optimizers,
    }


def _evaluate_targets(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of the issue, on every driver of the member it concerns."""
    checks: list[dict[str, Any]] = []
    for (model, member), bound in RATIO_TARGETS.items():
        for driver, row in models[model]["optimizers"].get(member, {}).items():
            checks.append({
                "model": model, "optimizer": member, "driver": driver, "kind": "ratio_to_base",
                "bound": bound, "value": row["ratio"], "met": row["ratio"] <= bound,
                "floor": row["floor"], "floor_ratio": row["ratio"] - row["over_floor"],
            })
    for model, result in models.items():
        rows = result["optimizers"]
        for other in BEAT:
            if other not in rows:
                continue
            bound = rows[other]["steps"]["ratio"]
            for driver, row in rows.get("sam", {}).items():
                checks.append({
                    "model": model, "optimizer": "sam", "driver": driver, "kind": f"no_slower_than:{other}",
                    "bound": bound, "value": row["ratio"], "met": row["ratio"] <= bound,
                })
    return checks


def _environment() -> dict[str, Any]:
    _, pto_version = _pytorch_optimizer_sam()
    return environment("cpu") | {
        "interop_threads": torch.get_num_interop_threads(),
        "pytorch_optimizer": pto_version,
    }


def _table(result: dict[str, Any]) -> Table:
    """model x optimizer x driver: ratio, spread, and one column per kind of target."""
    short = {PTO: "pto.SAM", LOOP: "loop"}
    kinds = {"ratio_to_base": "<= target"} | {f"no_slower_than:{o}": f"<= {short.get(o, o)}" for o in BEAT}
    table = Table(title="One step (forward + backward included) / one SGD step, same run")
    for column in ("model", "optimizer", "driver", "ratio", "over floor", "paired (IQR)", *kinds.values()):
        table.add_column(column, justify="left" if column in ("model", "optimizer", "driver") else "right")
    checks: dict[tuple[str, str, str, str], dict[str, Any]] = {
        (c["model"], c["optimizer"], c["driver"], c["kind"]): c for c in result["targets"]
    }
    for model, res in result["models"].items():
        first = True
        for member, drivers in res["optimizers"].items():
            for driver, row in drivers.items():
                cells = []
                for kind in kinds:
                    c = checks.get((model, member, driver, kind))
                    cells.append("" if c is None else f"{c['bound']:.2f} " + ("[green]ok[/]" if c["met"] else "[red]MISS[/]"))
                table.add_row(
                    model if first else "", member, driver, f"{row['ratio']:.3f}",
                    "" if member == BASE or driver == "floor" else f"{row['over_floor']:+.3f} ({row['floor']})",
                    f"{row['paired_ratio']:.3f} ({row['paired_ratio_q25']:.2f}-{row['paired_ratio_q75']:.2f})", *cells,
                )
                first = False
        table.add_section()
    return table


def markdown(result: dict[str, Any]) -> str:
    """The table of the README: every candidate's ratio, what it adds over its floor, the paired
    ratios, its own state and the targets that concern it."""
    checks: dict[tuple[str, str, str], list[str]] = {}
    for c in result["targets"]:
        bound = f"<= {c['bound']:.2f}" if c["kind"] == "ratio_to_base" else f"<= {c['kind'].split(':')[1]} ({c['bound']:.3f})"
        checks.setdefault((c["model"], c["optimizer"], c["driver"]), []).append(
            f"{bound} {'met' if c['met'] else '**missed**'}")
    rows = []
    for model, res in result["models"].items():
        for member, drivers in res["optimizers"].items():
            for driver, row in drivers.items():
                rows.append({
                    "model": model, "optimizer": member, "driver": driver, "ratio to SGD step": f"{row['ratio']:.3f}",
                    "floor": "" if driver == "floor" or member == BASE else row["floor"],
                    "over its floor": "" if driver == "floor" or member == BASE else f"{row['over_floor']:+.3f}",
                    "paired median (IQR)": f"{row['paired_ratio']:.3f} ({row['paired_ratio_q25']:.2f}-"
                                           f"{row['paired_ratio_q75']:.2f})",
                    "step (ms)": f"{row['median_step_s'] * 1e3:.2f}",
                    "own state (bytes)": row["member_state_bytes"] or "",
                    "target": "; ".join(checks.get((model, member, driver), [])),
                })
    cfg, env = result["config"], result["environment"]
    return (markdown_table(rows) + f"\n{env['device']}, {env['torch_threads']} torch thread(s), batch {cfg['batch_size']},"
            f" {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up steps, seed {cfg['seed']},"
            f" {result['wall_s']:.0f} s in all\n")


def run(out_dir: Path | None = None, quick: bool = False, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Time every candidate on every model, print a table and the JSON, write `optim.json` and
    `optim.md` (the table) to `out_dir` if given, and return the result. `quick` takes a few seconds (for tests; its ratios
    are too noisy to judge targets by)."""
    settings = QUICK if quick else FULL
    start = time.perf_counter()
    with torch_threads(threads):
        models = {spec.name: _bench_model(spec, seed, settings) for spec in MODELS}
        env = _environment()
    targets = _evaluate_targets(models)
    result = {
        "benchmark": "optim",
        "config": {
            "quick": quick, "seed": seed, "batch_size": BATCH_SIZE, "num_classes": NUM_CLASSES,
            "base": f"{BASE}(lr={LR}, momentum={MOMENTUM})", "rho_baselines": RHO,
            "members": OPTIMIZERS.names(), "drivers": list(DRIVERS), **settings,
            "method": (
                "round-robin interleaved, order rotated each round; ratio = median / median(base); "
                "paired_ratio = median over rounds of (step / base step of the same round); "
                "over_floor = ratio - ratio of the member's floor (its passes + one base step, nothing else)"
            ),
        },
        "environment": env,
        "models": models,
        "targets": targets,
        "all_targets_met": all(c["met"] for c in targets),
        "wall_s": time.perf_counter() - start,
    }
    console = bench_console()
    console.print(_table(result))
    console.print_json(data=result)
    if out_dir is not None:
        write_json(Path(out_dir) / "optim.json", result)
        atomic_write_text(Path(out_dir) / "optim.md", markdown(result))
    return result
