"""`samsuite unlearn run`: prepare (the embedded benchmark's models) -> evaluate the target -> unlearn
-> evaluate -> relearn -> evaluate, for every method x seed of one config, into `runs/<name>/`.

One run compares methods: `methods` lists UnlearnConfig settings laid over the shared `unlearn`
section (e.g. NPO and NPO+SAM, each with its paper hyperparameters), `seeds` repeats each, and the
table has one row per method with mean +- std over seeds. Every method and seed starts from the
same target model and is attacked with the same relearning draws (seeded by the run seed).

Run folder:
  config.yaml, metrics.jsonl (one record per evaluation: target, retrain, each unlearned model,
  each relearning eval point), summary.json (config, environment, aggregates), results.csv/.md,
  bars.png (before / after unlearning / after relearning), relearn_curves.png;
  <method>/seed<k>/train/ (the training loop's config, metrics.jsonl per step, summary),
  <method>/seed<k>/model/ (the unlearned model, Hugging Face format; removed after its relearning
  with keep_models=false), <method>/seed<k>/unlearned.json and relearned.json (the stages' results),
  <method>/seed<k>/relearn/ (the attack: relearn.json, one folder per draw).

Resume: every stage writes its result file last; a rerun skips a stage whose file holds the same
settings (recomputing it, and what follows, when they changed), and an interrupted unlearning
continues from its checkpoint (the training loop's resume).

Several processes (torchrun, or `--nproc`): every rank walks the same stages; rank 0 alone reads and
writes the run folder (`unlearn.distributed.on_main`), the training shards the model and its batches,
the evaluation shares its batches out, and the numbers are those of one process. Every rank loads the
models rank 0 saved, so on several machines the run folder must be on a file system they all see.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from shared.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from shared.errors import RunError
from shared.runio import RunDir, check_run_name, environment, read_result, write_json
from shared.threads import torch_threads
from shared.validate import check_choice, check_device
from unlearn.distributed import World, check_split, check_world, claim_on_main, on_main, save_model, world
from unlearn.matched import (
    MatchedSettings,
    check_validation,
    choose_budget,
    fits,
    split_validation,
    validation_view,
)
from unlearn.relearn import (
    RelearnConfig,
    benchmark_eval_fn,
    curve_metrics,
    curve_stats,
    draw_samples,
    mean_std,
    relearn,
)
from unlearn.train import UnlearnConfig, unlearn

REFERENCES = ("target", "retrain")
PRIMARY = "relearn"  # the `relearn` section's attack (its files keep the names they had before `attacks`)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PrepareSettings:
    """The embedded benchmark's "target" and "retrain" models (`samsuite unlearn prepare`), built
    in `out_dir` unless they are there already with the same settings."""

    scale: Literal["tiny", "smollm2"] = "tiny"
    out_dir: str = "runs/toy-models"
    overrides: list[str] = field(default_factory=list, metadata={"help": "key=value training settings (epochs=5)"})


@dataclass
class EvalSettings:
    metrics: list[str] | None = field(default=None, metadata={"help": "None: every metric the benchmark has"})
    max_samples: int | None = field(default=None, metadata={"help": "first N rows of every evaluated split"})
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"eval.max_samples: expected an integer >= 1 (or null), got {self.max_samples}")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("eval.metrics: expected at least one metric (or null for all)")


def _demo_unlearn() -> UnlearnConfig:
    # The tiny model of `samsuite unlearn prepare` (1M parameters, trained from scratch at lr 3e-3)
    # needs a far larger lr than a pretrained 7B model (5e-6), and a larger SAM radius (rho 0.01
    # moves its weights by a negligible fraction); gamma 2 keeps the retain NLL lower than gamma 1.
    return UnlearnConfig(objective="npo", lr=1e-3, steps=30, batch_size=8, max_length=128, beta=0.1, gamma=2.0,
                         rho=0.1, save_every=10)


def _demo_relearn() -> RelearnConfig:
    return RelearnConfig(n_samples=20, draws=2, lr=1e-3, steps=10, batch_size=4, max_length=128, eval_every=2)


def _demo_methods() -> list[dict[str, Any]]:
    return [{"objective": "npo", "smoother": "none"}, {"objective": "npo", "smoother": "sam"}]


@dataclass
class RunConfig:
    """`samsuite unlearn run` settings. The defaults are the CPU demo: NPO vs NPO+SAM on the embedded
    benchmark with the tiny model. Override any field with key=value (methods.0.rho is not supported:
    give the whole list, e.g. 'methods=[{objective: npo}, {objective: npo, smoother: rs}]')."""

    name: str = "unlearn-demo"
    out_dir: str = "runs"
    # benchmark and models
    benchmark: str = field(default="toy", metadata={"help": "toy, wmdp, muse-news, muse-books or a saved folder"})
    benchmark_seed: int = field(default=0, metadata={"help": "the toy benchmark's (and its models') seed"})
    subsets: list[str] | None = field(default=None, metadata={"help": "WMDP domains (default all)"})
    paths: dict[str, str] = field(default_factory=dict, metadata={"help": "local copies of benchmark tables"})
    cache_dir: str | None = None
    model: str = field(default="target", metadata={"help": "a name in the benchmark's models, a folder or a hub id"})
    retrain: str | None = field(default="retrain", metadata={"help": "the retrained model (PrivLeak); null: none"})
    dtype: str = "float32"
    device: str = "auto"
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    # what is compared
    unlearn: UnlearnConfig = field(default_factory=_demo_unlearn, metadata={"help": "shared by every method"})
    methods: list[dict[str, Any]] = field(
        default_factory=_demo_methods,
        metadata={"help": "UnlearnConfig settings laid over `unlearn`, one entry per compared method; optional "
                          "'label' (default objective+smoother)"},
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    relearn: RelearnConfig = field(default_factory=_demo_relearn)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "further attacks, name -> RelearnConfig settings laid over `relearn` (a section replaces its "
                "counterpart whole), e.g. {lora: {lr: 2.0e-4, options: {lora: true, lora_r: 128, lora_alpha: 16}}, "
                "unrelated: {data: retain, n_samples: 10}}"})
    eval: EvalSettings = field(default_factory=EvalSettings)
    matched: MatchedSettings | None = field(default=None, metadata={
        "help": "matched efficacy: each method's unlearning steps calibrated on the validation split "
                "(unlearn.matched); null: the configured steps"})
    # run
    keep_models: bool = field(default=True, metadata={"help": "keep each unlearned model after its relearning"})
    # Small models run fastest on one thread, and on a busy 2-core machine two threads made the
    # tiny model's training 20x slower (measured); raise it (or null: torch's choice) for big CPU models.
    threads: int | None = 1
    resume: bool = True

    def __post_init__(self) -> None:
        check_run_name(self.name)
        check_choice("dtype", self.dtype, DTYPES)
        check_device("device", self.device, here=False)  # on this machine: checked when the run starts
        if not self.seeds:
            raise ConfigError("seeds: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: listed twice in {self.seeds}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: expected an integer >= 1 (or null), got {self.threads}")
        if not self.methods:
            raise ConfigError("methods: expected at least one method, e.g. [{objective: npo, smoother: sam}]")
        labels = [self.method_label(i) for i in range(len(self.methods))]
        for i, label in enumerate(labels):
            if labels.index(label) != i:
                raise ConfigError(f"methods[{i}]: a second method labelled '{label}'; give one a distinct 'label'")
            if not label or "/" in label or label.startswith("."):
                raise ConfigError(f"methods[{i}].label: '{label}' cannot name a folder")
            self.method_config(i, self.seeds[0])  # every method's settings are checked before any work
        for name in self.attacks:
            if name == PRIMARY or not name or "/" in name or name.startswith("."):
                raise ConfigError(f"attacks.{name}: not an attack name ('{PRIMARY}' is the `relearn` section's; "
                                  "a name must be able to name a folder)")
            self.unit_relearn(self.seeds[0], name)

    def method_label(self, i: int) -> str:
        method = self.methods[i]
        if "label" in method:
            return str(method["label"])
        objective = method.get("objective", self.unlearn.objective)
        smoother = method.get("smoother", self.unlearn.smoother)
        return objective if smoother == "none" else f"{objective}+{smoother}"

    def method_config(self, i: int, seed: int) -> UnlearnConfig:
        """Method `i`'s training settings for `seed`."""
        method = self.methods[i]
        if not isinstance(method, Mapping):
            raise ConfigError(f"methods[{i}]: expected a mapping of UnlearnConfig settings, got {method!r}")
        settings = {k: v for k, v in method.items() if k != "label"}
        for key in ("seed", "resume"):
            if key in settings:
                raise ConfigError(f"methods[{i}].{key}: set by the run (seeds, resume)")
        try:
            return from_dict(UnlearnConfig, {**to_dict(self.unlearn), **settings, "seed": seed, "resume": self.resume},
                             f"methods[{i}]")
        except ConfigError as err:  # UnlearnConfig's own checks name the field without the method
            if str(err).startswith("methods["):
                raise
            raise ConfigError(f"methods[{i}].{err}") from None

    def baselines(self) -> dict[str, str]:
        """Each smoothed method's plain counterpart: the first method with its objective and no smoother."""
        settings = [self.method_config(i, self.seeds[0]) for i in range(len(self.methods))]
        out = {}
        for i, cfg in enumerate(settings):
            plain = next((j for j, other in enumerate(settings) if other.objective == cfg.objective
                          and other.smoother == "none"), None)
            if cfg.smoother != "none" and plain is not None:
                out[self.method_label(i)] = self.method_label(plain)
        return out

    def attack_names(self) -> list[str]:
        return [PRIMARY, *self.attacks]

    def unit_relearn(self, seed: int, attack: str = PRIMARY) -> RelearnConfig:
        """Attack `attack` on the models of `seed`: the same draws for every method."""
        from shared.seeding import derive_seed

        where = "relearn" if attack == PRIMARY else f"attacks.{attack}"
        extra = self.attacks[attack] if attack != PRIMARY else {}
        settings = {**to_dict(self.relearn), **extra, "seed": derive_seed(self.relearn.seed, seed) % 2**31}
        return from_dict(RelearnConfig, settings, where)


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config from `path` (else the demo defaults) with `key=value` overrides. Overrides
    change single fields of the base, nested ones included (unlearn.lr=0.0001 keeps the other
    `unlearn` settings); a section written in a file replaces the demo's section."""
    data = to_dict(RunConfig()) if path is None else read_yaml(path)
    return from_dict(RunConfig, apply_overrides(data, overrides))


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class _Run:
    """What the stages share: the config, the run folder, the benchmark and its evaluation."""

    cfg: RunConfig
    run: RunDir
    device: str
    bench: Any = None
    metrics: list[str] = field(default_factory=list)
    retrain_auc: float | None = None
    matched_target: float | None = None  # the forget efficacy the calibrations aim at (cfg.matched)
    w: World = field(default_factory=World)

    def stage(self, path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored result at `path` if it was computed with `key` (and resuming), as rank 0 reads it."""
        record = on_main(lambda: read_result(path), self.w) if self.cfg.resume else None
        return record if isinstance(record, dict) and record.get("key") == json.loads(json.dumps(key)) else None

    def write(self, path: Path, record: Mapping[str, Any]) -> None:
        if self.w.main:
            write_json(path, record)

    def load(self, spec: str) -> tuple[Any, Any]:
        from unlearn.models import load_model

        return load_model(spec, dtype=self.cfg.dtype, device=self.device)

    def evaluate(self, model: Any, tokenizer: Any, metrics: Sequence[str] | None = None) -> dict[str, float]:
        from unlearn.eval import evaluate

        e = self.cfg.eval
        return evaluate(model, tokenizer, self.bench, metrics=list(metrics or self.metrics), max_samples=e.max_samples,
                        batch_size=e.batch_size, retrain_auc=self.retrain_auc)

    def log(self, stage: str, values: Mapping[str, Any], **where: Any) -> None:
        if self.w.main:
            self.run.log({"stage": stage, **where, **values})


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _prepares(cfg: RunConfig) -> bool:
    """Whether the run builds the embedded benchmark's models itself (`samsuite unlearn prepare`)."""
    return cfg.benchmark == "toy" and cfg.model == "target"


def _benchmark(cfg: RunConfig) -> Any:
    """The benchmark, its reference models resolved (for the toy: where `prepare` puts them)."""
    from unlearn.benchmarks import load_benchmark

    bench = load_benchmark(cfg.benchmark, cache_dir=cfg.cache_dir, paths=cfg.paths or None, subsets=cfg.subsets,
                           seed=cfg.benchmark_seed)
    if _prepares(cfg):
        bench.models = {name: str(Path(cfg.prepare.out_dir) / name) for name in REFERENCES}
    if cfg.matched is not None and cfg.matched.split is not None:
        bench = split_validation(bench, cfg.matched.split, cfg.matched.split_seed)
    return bench


def _retrain_spec(cfg: RunConfig, bench: Any) -> str | None:
    """The retrained model's spec, or None (the default "retrain" where the benchmark has none)."""
    if cfg.retrain == "retrain" and "retrain" not in bench.models:
        return None
    return _resolve(bench, cfg.retrain)


def check_run(cfg: RunConfig, bench: Any, w: World | None = None) -> None:
    """Every stage's settings against the benchmark and the processes `w`, before any stage runs (and
    before the run folder is touched): the metrics of the evaluations and of the relearning curve, the
    attack's sample count, the prepare settings, the model specs, and what `w.size` processes cannot
    share (a batch they do not divide, fewer texts than processes, GP)."""
    from unlearn.eval import PRIVLEAK, available_metrics, default_metrics
    from unlearn.models import check_model_spec

    retrain = _retrain_spec(cfg, bench)
    auc = 0.0 if retrain is not None else None  # a placeholder: whether privleak can be had
    available = available_metrics(bench, retrain_auc=auc)
    wanted = cfg.eval.metrics or default_metrics(bench, retrain_auc=auc)
    missing = [m for m in wanted if m not in available]
    if missing:
        why = " (privleak needs a retrained model: set retrain=)" if PRIVLEAK in missing and retrain is None else ""
        raise ConfigError(f"eval.metrics: {bench.name} cannot compute {missing}{why}; it has: {', '.join(available)}")
    for attack, where, rcfg in _attacks(cfg):
        curve_metrics(bench, rcfg.metrics, wanted)
        if rcfg.data not in bench.corpora:
            raise ConfigError(f"{where}.data: {bench.name} has no '{rcfg.data}' corpus to fine-tune on; it has: "
                              f"{', '.join(bench.corpora)}")
        try:
            draw_samples(len(bench.corpora[rcfg.data]), rcfg.n_samples, 0, 0, rcfg.data)
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}") from None
    if cfg.matched is not None:
        check_validation(bench, cfg.matched, available)
        if cfg.matched.target is None and retrain is None:
            raise ConfigError("matched.target: there is no retrained model to match (retrain: null); give the "
                              "forget efficacy to reach, e.g. matched.target=0.25 (chance on 4 choices)")
    _check_world(cfg, bench, w or world())
    if _prepares(cfg):
        from unlearn.prepare import check_settings

        check_settings(cfg.prepare.scale, cfg.benchmark_seed, cfg.prepare.overrides, cfg.prepare.out_dir)
    else:
        check_model_spec(_resolve(bench, cfg.model), "model")
        if retrain is not None:
            check_model_spec(retrain, "retrain")


def _attacks(cfg: RunConfig) -> list[tuple[str, str, RelearnConfig]]:
    """(name, config section, settings) of every attack, for the first seed (what the checks need)."""
    return [(a, "relearn" if a == PRIMARY else f"attacks.{a}", cfg.unit_relearn(cfg.seeds[0], a))
            for a in cfg.attack_names()]


def _check_world(cfg: RunConfig, bench: Any, w: World) -> None:
    if w.size == 1:
        return
    for i in range(len(cfg.methods)):
        try:
            check_world(cfg.method_config(i, cfg.seeds[0]), w)
        except ConfigError as err:
            raise ConfigError(f"methods[{i}].{err}") from None
    for _, where, rcfg in _attacks(cfg):
        try:
            check_world(rcfg.train_config(0), w)
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}") from None
        check_split(f"{where}.n_samples", rcfg.n_samples or len(bench.corpora[rcfg.data]), w)
    check_split("forget", len(bench.corpora["forget"]), w)
    if "retain" in bench.corpora:
        check_split("retain", len(bench.corpora["retain"]), w)
    if _prepares(cfg):
        from unlearn.prepare import check_settings

        check_settings(cfg.prepare.scale, cfg.benchmark_seed, cfg.prepare.overrides, cfg.prepare.out_dir, w)


def _resolve(bench: Any, spec: str | None) -> str | None:
    return bench.models.get(spec, spec) if spec is not None else None


def _references(ctx: _Run) -> dict[str, dict[str, Any]]:
    """Evaluate the retrained model first (its privleak AUC makes every other model's PrivLeak), then
    the target; sets the run's metric list."""
    from unlearn.eval import PRIVLEAK, default_metrics, privleak

    cfg = ctx.cfg
    retrain = _retrain_spec(cfg, ctx.bench)
    out: dict[str, dict[str, Any]] = {}
    validation = cfg.matched.validation_metrics() if cfg.matched is not None else []
    if retrain is not None:
        wanted = [m for m in (cfg.eval.metrics or default_metrics(ctx.bench)) if m != PRIVLEAK]
        if "privleak_auc" in default_metrics(ctx.bench) and "privleak_auc" not in wanted:
            wanted.append("privleak_auc")
        out["retrain"] = _reference(ctx, "retrain", retrain, wanted + validation)
        ctx.retrain_auc = out["retrain"]["metrics"].get("privleak_auc")
    ctx.metrics = list(cfg.eval.metrics or default_metrics(ctx.bench, ctx.retrain_auc))
    if "retrain" in out and PRIVLEAK in ctx.metrics:  # 0 by definition; shown in the table for reference
        out["retrain"]["metrics"][PRIVLEAK] = privleak(ctx.retrain_auc, ctx.retrain_auc)
    out["target"] = _reference(ctx, "target", _resolve(ctx.bench, cfg.model), ctx.metrics + validation)
    if cfg.matched is not None:
        ctx.matched_target = cfg.matched.target if cfg.matched.target is not None else \
            out["retrain"]["metrics"][validation[0]]
    return {name: out[name] for name in REFERENCES if name in out}


def _reference(ctx: _Run, name: str, spec: str, metrics: list[str]) -> dict[str, Any]:
    key = {"model": spec, "metrics": metrics, "eval": to_dict(ctx.cfg.eval), "benchmark": _bench_key(ctx.cfg),
           "retrain_auc": ctx.retrain_auc if name != "retrain" else None}
    path = ctx.run.path / f"{name}.json"
    record = ctx.stage(path, key)
    if record is None:
        model, tokenizer = ctx.load(spec)
        start = time.perf_counter()
        record = {"key": key, "model": spec, "metrics": ctx.evaluate(model, tokenizer, metrics),
                  "time_s": round(time.perf_counter() - start, 2)}
        del model
        ctx.write(path, record)
    ctx.log(name, record["metrics"])
    return record


def _bench_key(cfg: RunConfig) -> dict[str, Any]:
    """What the benchmark's tables depend on (a held-out validation split shrinks the test tables)."""
    key = {"benchmark": cfg.benchmark, "seed": cfg.benchmark_seed, "subsets": cfg.subsets, "paths": cfg.paths}
    if cfg.matched is not None and cfg.matched.split is not None:
        key["validation"] = {"split": cfg.matched.split, "seed": cfg.matched.split_seed}
    return key


def _attack_paths(folder: Path, attack: str) -> tuple[Path, Path]:
    """The attack's result file and folder: relearned.json and relearn/ for the `relearn` section's."""
    suffix = "" if attack == PRIMARY else f"-{attack}"
    return folder / f"relearned{suffix}.json", folder / f"relearn{suffix}"


def _unit(ctx: _Run, i: int, seed: int, retain: list[str]) -> dict[str, Any]:
    """Method i with `seed`: unlearn and evaluate, then every attack (each stage skipped when done)."""
    cfg = ctx.cfg
    label = cfg.method_label(i)
    folder = ctx.run.path / label / f"seed{seed}"
    ucfg = cfg.method_config(i, seed)
    target = _resolve(ctx.bench, cfg.model)
    settings = {k: v for k, v in to_dict(ucfg).items() if k != "resume"}  # how the run goes on, not what it computes
    key = {"unlearn": settings, "model": target, "metrics": ctx.metrics, "eval": to_dict(cfg.eval),
           "benchmark": _bench_key(cfg), "retrain_auc": ctx.retrain_auc}
    attacks = {}
    for attack in cfg.attack_names():
        rcfg = cfg.unit_relearn(seed, attack)
        curve = curve_metrics(ctx.bench, rcfg.metrics, ctx.metrics)
        attacks[attack] = (rcfg, curve, {"relearn": to_dict(rcfg), "metrics": curve, "eval": to_dict(cfg.eval)})
    calibration = None
    if cfg.matched is not None:
        calibration = _calibrate(ctx, label, ucfg, folder, target, retain)
        if calibration["chosen"] is None:  # reported as unmatched, not compared
            return {"method": label, "seed": seed, "matched": False, "calibration": calibration,
                    "time": {"calibration": calibration.get("time")}}
        ucfg = replace(ucfg, steps=calibration["chosen"])
        key["unlearn"] = {k: v for k, v in to_dict(ucfg).items() if k != "resume"}
    unlearned = ctx.stage(folder / "unlearned.json", key)
    done = {a: ctx.stage(_attack_paths(folder, a)[0], k) if unlearned is not None else None
            for a, (_, _, k) in attacks.items()}
    fresh = False  # unlearned now (not read back): its attacks must run again too
    saved = on_main(lambda: (folder / "model" / "config.json").is_file(), ctx.w)
    if unlearned is not None and None in done.values() and not saved:
        unlearned = None  # the model was removed (keep_models=false) and an attack must run again
    if unlearned is None:
        reuse = calibration is not None and calibration.get("reusable", False) and saved
        unlearned = {"key": key, "method": label, "seed": seed,
                     **_unlearn_unit(ctx, ucfg, folder, target, retain, calibration if reuse else None)}
        ctx.write(folder / "unlearned.json", unlearned)
        done, fresh = dict.fromkeys(attacks), True
    ctx.log("unlearned", unlearned["metrics"], method=label, seed=seed)
    model = tokenizer = None
    for attack, (rcfg, curve, attack_key) in attacks.items():
        path, run_dir = _attack_paths(folder, attack)
        if done[attack] is None:
            if model is None:  # the attacks start from the saved model (on several processes the unlearned one
                model, tokenizer = ctx.load(str(folder / "model"))  # is sharded); each restores it when done
            eval_fn = benchmark_eval_fn(tokenizer, ctx.bench, curve, max_samples=cfg.eval.max_samples,
                                        batch_size=cfg.eval.batch_size)
            start = time.perf_counter()
            known = unlearned["metrics"]  # the same weights' values: the curve's step 0, not evaluated again
            result = relearn(model, tokenizer, list(ctx.bench.corpora[rcfg.data]["text"]), rcfg, eval_fn=eval_fn,
                             run_dir=run_dir, resume=cfg.resume and not fresh,
                             initial={m: known[m] for m in curve} if all(m in known for m in curve) else None)
            done[attack] = {"key": attack_key, "method": label, "seed": seed, "attack": attack, "curve": result["curve"],
                            "final": result["final"],
                            "draws": [{k: d[k] for k in ("draw", "samples", "curve", "final_loss")}
                                      for d in result["draws"]],
                            "time": _times(start, *(sum(d.get("time", {}).get(k, 0.0) for d in result["draws"])
                                                    for k in ("train_s", "eval_s")))}
            ctx.write(path, done[attack])
        for row in done[attack]["curve"]:
            ctx.log("relearn", {k: v for k, v in row.items() if k != "step"}, method=label, seed=seed,
                    step=row["step"], **({} if attack == PRIMARY else {"attack": attack}))
    del model
    if not cfg.keep_models and ctx.w.main and (folder / "model").is_dir():
        shutil.rmtree(folder / "model")
    primary = done[PRIMARY]
    times = {"calibration": (calibration or {}).get("time"), "unlearning": unlearned.get("time"),
             **{a: done[a].get("time") for a in attacks}}  # None: done before stages were timed
    return {"method": label, "seed": seed, "time": times, "unlearned": unlearned["metrics"],
            "relearned": primary["final"],
            "curve": primary["curve"], "draws": primary["draws"], "train": unlearned["train"],
            "attacks": {a: {k: done[a][k] for k in ("final", "curve", "draws")} for a in attacks},
            **({"matched": True, "calibration": calibration} if calibration is not None else {})}


def _unlearn_unit(ctx: _Run, ucfg: UnlearnConfig, folder: Path, target: str, retain: list[str],
                  calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """Unlearn (or take the model of `calibration`, which stopped at this budget), evaluate, and save the
    model to `folder`/model: the unit's metrics, training summary and times."""
    start = time.perf_counter()
    if calibration is not None:
        model, tokenizer = ctx.load(str(folder / "model"))
        summary = {**calibration["train"], "train_time_s": 0.0, "eval_time_s": 0.0}
    else:
        model, tokenizer = ctx.load(target)
        summary = unlearn(model, tokenizer, list(ctx.bench.corpora["forget"]["text"]), retain, ucfg,
                          run_dir=folder / "train", replace_stale=True)
    evaluated = time.perf_counter()
    values = ctx.evaluate(model, tokenizer)
    eval_s = time.perf_counter() - evaluated
    if calibration is None:
        save_model(model, tokenizer, folder / "model", ctx.w)
    del model
    if ctx.w.main:
        for leftover in (folder / "train").glob("checkpoint.*"):  # model/ is the product now
            leftover.unlink()
    return {"metrics": values, "reused_calibration": calibration is not None,
            "train": {k: summary[k] for k in TRAIN_SUMMARY},
            "time": _times(start, summary["train_time_s"], summary["eval_time_s"] + eval_s)}


TRAIN_SUMMARY = ("steps", "time_s", "step_time_s", "trainable_params", "final")  # what a unit keeps of unlearn()'s


def _calibrate(ctx: _Run, label: str, ucfg: UnlearnConfig, folder: Path, target: str, retain: list[str]
               ) -> dict[str, Any]:
    """The unit's calibration (`unlearn.matched`): unlearn with the validation metrics at every budget until
    the first one inside the band (or the largest), the budget chosen; calibration.json (skipped when done
    with the same settings). A constant learning rate does not depend on the total steps, so the calibration
    stopped at the chosen budget is the run of that budget: its model is kept as the unit's (model/,
    "reusable") and the unit does not train again."""
    settings = ctx.cfg.matched
    run = replace(ucfg, steps=settings.budgets[-1], eval_every=settings.every, save_every=0)  # what it computes
    matched = {k: v for k, v in to_dict(settings).items() if k not in ("split", "split_seed")}  # in _bench_key
    key = {"unlearn": {k: v for k, v in to_dict(run).items() if k != "resume"}, "matched": matched, "model": target,
           "target": ctx.matched_target, "eval": to_dict(ctx.cfg.eval), "benchmark": _bench_key(ctx.cfg)}
    path = folder / "calibration.json"
    record = ctx.stage(path, key)
    if record is None:
        start = time.perf_counter()
        model, tokenizer = ctx.load(target)
        eval_fn = benchmark_eval_fn(tokenizer, validation_view(ctx.bench, settings.validation_metrics()),
                                    settings.validation_metrics(),
                                    max_samples=ctx.cfg.eval.max_samples, batch_size=ctx.cfg.eval.batch_size)
        budgets = set(settings.budgets)
        # a checkpoint at every budget, so that an interrupted calibration goes on from its last one
        summary = unlearn(model, tokenizer, list(ctx.bench.corpora["forget"]["text"]), retain,
                          replace(run, save_every=settings.every), run_dir=folder / "calibration", eval_fn=eval_fn,
                          replace_stale=True,
                          stop=lambda step, values: step in budgets and fits(values, settings, ctx.matched_target))
        curve = [{k: v for k, v in r.items() if k != "kind"} for r in summary["evals"]]
        choice = choose_budget(curve, settings, ctx.matched_target)
        reusable = choice["chosen"] == summary["steps"] and ucfg.schedule == "constant"
        if reusable:
            save_model(model, tokenizer, folder / "model", ctx.w)
        del model
        if ctx.w.main:
            for leftover in (folder / "calibration").glob("checkpoint.*"):  # the record (and model/) is the product
                leftover.unlink()
        record = {"key": key, **choice, "curve": curve, "reusable": reusable,
                  "train": {k: summary[k] for k in TRAIN_SUMMARY},
                  "time": _times(start, summary["train_time_s"], summary["eval_time_s"])}
        ctx.write(path, record)
    ctx.log("calibration", {"chosen": record["chosen"]}, method=label, seed=ucfg.seed)
    return {k: v for k, v in record.items() if k != "key"}


def _times(start: float, train_s: float, eval_s: float) -> dict[str, float]:
    """A stage's wall time since `start` and its training and evaluation shares (the rest: loading, saving)."""
    return {"total_s": round(time.perf_counter() - start, 3), "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)}


# ---------------------------------------------------------------------------------------------- results
def aggregate(units: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: seeds, {"mean", "std" (None for one seed)} over seeds of every metric after
    unlearning and after relearning (each seed's relearning value is already the mean over its
    draws), and the relearning curve over all draws of all seeds; the same for each further attack
    under "attacks"."""

    def stats(values: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
        names = [k for k in values[0] if not k.endswith("_std")]
        return {m: dict(zip(("mean", "std"), mean_std([v[m] for v in values]))) for m in names}

    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(u["method"] for u in units):
        mine = [u for u in units if u["method"] == label]
        entry: dict[str, Any] = {"seeds": [u["seed"] for u in mine]}
        for stage in ("unlearned", "relearned"):
            entry[stage] = stats([u[stage] for u in mine])
        entry["curve"] = curve_stats([d["curve"] for u in mine for d in u["draws"]])
        entry["attacks"] = {a: {"relearned": stats([u["attacks"][a]["final"] for u in mine]),
                                "curve": curve_stats([d["curve"] for u in mine for d in u["attacks"][a]["draws"]])}
                            for a in mine[0].get("attacks", {}) if a != PRIMARY}
        out[label] = entry
    return out


def _fmt(stat: Mapping[str, float | None] | float | None) -> str:
    """0.512 (one value) or 0.512 ± 0.031 (mean ± std over seeds)."""
    if stat is None:
        return ""
    mean, std = (stat["mean"], stat["std"]) if isinstance(stat, Mapping) else (stat, None)
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


RELEARNED = " after relearning"


def table_rows(references: Mapping[str, Mapping[str, Any]], methods: Mapping[str, Mapping[str, Any]],
               metrics: Sequence[str], curve: Sequence[str], extra: Mapping[str, Sequence[str]] | None = None
               ) -> list[dict[str, str]]:
    """The results table: the reference models, then one row per method (mean ± std over seeds):
    every metric after unlearning, the curve metrics after relearning, then after each further attack
    (`extra`: attack -> its curve metrics)."""
    extra = extra or {}
    rows = []
    for name, ref in references.items():
        rows.append({"model": name, "seeds": "", **{m: _fmt(ref["metrics"].get(m)) for m in metrics},
                     **{m + RELEARNED: "" for m in curve},
                     **{f"{m} after {a}": "" for a, names in extra.items() for m in names}})
    for label, entry in methods.items():
        rows.append({"model": label, "seeds": str(len(entry["seeds"])),
                     **{m: _fmt(entry["unlearned"].get(m)) for m in metrics},
                     **{m + RELEARNED: _fmt(entry["relearned"].get(m)) for m in curve},
                     **{f"{m} after {a}": _fmt(entry["attacks"][a]["relearned"].get(m))
                        for a, names in extra.items() for m in names}})
    return rows


def _write_results(ctx: _Run, references: dict[str, Any], units: list[dict[str, Any]], start: float,
                   prepared: dict[str, Any] | None) -> dict[str, Any]:
    from shared.report import write_table
    from unlearn.plots import relearn_curves, stage_bars

    cfg, path = ctx.cfg, ctx.run.path
    calibration = _calibration_table(ctx, units) if cfg.matched is not None else None
    profile = _profile(ctx, references, units)
    unmatched = [{"method": u["method"], "seed": u["seed"]} for u in units if u.get("matched") is False]
    units = [u for u in units if u.get("matched") is not False]  # an unmatched method is reported, not compared
    if not units:
        ctx.run.write_json("summary.json", {"name": cfg.name, "config": to_dict(cfg), "calibration": calibration,
                                            "unmatched": unmatched, "units": []})
        raise RunError(f"matched: no method reached the band at any budget ({cfg.name}/calibration.md); widen "
                       "matched.band or add larger matched.budgets")
    methods = aggregate(units)
    refs = {name: r["metrics"] for name, r in references.items()}
    title = f"{cfg.benchmark}: {', '.join(methods)} ({len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''})"
    curves = {a: curve_metrics(ctx.bench, rcfg.metrics, ctx.metrics) for a, _, rcfg in _attacks(cfg)}
    curve = curves[PRIMARY]
    rows = table_rows(references, methods, ctx.metrics, curve, {a: c for a, c in curves.items() if a != PRIMARY})
    write_table(path / "results", rows, title=title)
    stage_bars(path / "bars.png", methods, refs, ctx.metrics, title)
    for attack, _, rcfg in _attacks(cfg):
        primary = attack == PRIMARY
        relearn_curves(path / ("relearn_curves.png" if primary else f"relearn_curves-{attack}.png"),
                       {label: m["curve"] if primary else m["attacks"][attack]["curve"] for label, m in methods.items()},
                       refs, curves[attack], f"{'Relearning attack' if primary else f'Attack {attack}'}: "
                       f"{rcfg.n_samples or 'all'} {rcfg.data} samples, {rcfg.draws} draw(s) per seed")
    resilience = _resilience(ctx, references, units, curves)
    summary = {
        "name": cfg.name,
        "config": to_dict(cfg),
        "seeds": list(cfg.seeds),
        "metrics": ctx.metrics,
        "curve_metrics": curve,
        "references": references,
        "retrain_privleak_auc": ctx.retrain_auc,
        "prepare": prepared,
        "methods": methods,
        "resilience": resilience,
        "calibration": calibration,
        "unmatched": unmatched,
        "units": units,
        "table": rows,
        "profile": profile,
        "time_s": round(time.perf_counter() - start, 1),
        "environment": environment(ctx.device) | {"processes": ctx.w.size},
    }
    ctx.run.write_json("summary.json", summary)
    return summary


def check_pipeline(cfg: RunConfig, w: World | None = None) -> Any:
    """What `run_pipeline` checks before it touches the run folder (the device, the benchmark, every
    stage's settings against it and the processes `w`); returns the benchmark."""
    check_device("device", cfg.device)
    bench = _benchmark(cfg)
    check_run(cfg, bench, w)
    return bench


def _resilience(ctx: _Run, references: Mapping[str, Any], units: list[dict[str, Any]],
                curves: Mapping[str, list[str]]) -> dict[str, Any]:
    """The relearning summaries (`unlearn.summaries`) of every attack: per method, and smoothed - plain
    paired over seeds (each seed's draws averaged: they attack one model) and over (seed, draw); written as
    resilience.csv/.md and paired.csv/.md."""
    from shared.report import write_table
    from unlearn.summaries import SUMMARIES, method_summaries, paired_summaries, seed_means, unit_summaries

    def cell(stat: Mapping[str, Any]) -> str:
        return _fmt(stat if stat["mean"] is not None else None)

    def interval(row: Mapping[str, Any]) -> str:
        return "" if row["ci_low"] is None else f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"

    out: dict[str, Any] = {"pairs": ctx.cfg.baselines(), "attacks": {}}
    rows, paired_rows = [], []
    for attack, curve in curves.items():
        draws = [{**u, "draws": u["attacks"][attack]["draws"]} for u in units]
        summaries = unit_summaries(draws, references["target"]["metrics"], curve)
        per_method = method_summaries(summaries, curve)
        paired = {"seeds": paired_summaries(seed_means(summaries), out["pairs"], curve),
                  "draws": paired_summaries(summaries, out["pairs"], curve)}
        out["attacks"][attack] = {"methods": per_method, "paired": paired["seeds"], "paired_draws": paired["draws"]}
        rows += [{"attack": attack, "method": label,
                  **{f"{m} {name}": cell(per_method[label][name][m]) for name in SUMMARIES for m in curve}}
                 for label in per_method]
        paired_rows += [{"attack": attack, "comparison": f"{r['method']} - {r['baseline']}", "summary": r["summary"],
                         "metric": r["metric"], "paired over": over, "pairs": str(r["n"]),
                         "mean difference": f"{r['mean']:+.3f}", "95% CI": interval(r),
                         "p": "" if r["p_value"] is None else f"{r['p_value']:.3g}"}
                        for over, key in (("seeds", "seeds"), ("(seed, draw)", "draws")) for r in paired[key]]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    write_table(ctx.run.path / "resilience", [{c: row.get(c, "") for c in columns} for row in rows],
                title="After each attack, over seeds and draws: AUC of each forget curve (its mean over the steps), "
                      "recovery (after - unlearned) / (target - unlearned), final value")
    seed_pairs = [{**r, "attack": a} for a in curves for r in out["attacks"][a]["paired"]]
    if seed_pairs:
        from unlearn.plots import paired_forest

        matched = ctx.cfg.matched.metric if ctx.cfg.matched is not None else None
        metric = matched if matched in curves[PRIMARY] else curves[PRIMARY][0]  # what the methods were matched on
        paired_forest(ctx.run.path / "paired.png", seed_pairs, metric, "auc",
                      f"Smoothed - plain, AUC of {metric} over each attack, paired over seeds (95 % t interval)")
    if paired_rows:
        write_table(ctx.run.path / "paired", paired_rows,
                    title="Smoothed - plain, paired over seeds (each seed's draws averaged: they attack one model) "
                          "and over (seed, draw): negative = less came back with the smoother")
    return out


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage of `cfg` not done yet; returns the summary (also runs/<name>/summary.json).
    Everything is checked (the config, the benchmark and every stage's settings against it, the run
    folder) before anything is written."""
    start = time.perf_counter()
    w = world()
    with torch_threads(cfg.threads):
        bench = check_pipeline(cfg, w)
        with claim_on_main(cfg.out_dir, cfg.name, "unlearn", w) as run:
            ctx = _Run(cfg, run, _device(cfg.device), bench, w=w)
            if w.main:
                ctx.run.write_config(to_dict(cfg))
                ctx.run.truncate_metrics(0)  # rebuilt from the stages' result files as the run walks them
            prepared = None
            if _prepares(cfg):
                from unlearn.prepare import prepare

                p = cfg.prepare
                prepared = prepare(p.out_dir, scale=p.scale, seed=cfg.benchmark_seed, overrides=p.overrides,
                                   device=ctx.device)
            retain = list(bench.corpora["retain"]["text"]) if "retain" in bench.corpora else []
            references = _references(ctx)
            units = [_unit(ctx, i, seed, retain) for i in range(len(cfg.methods)) for seed in cfg.seeds]
            return on_main(lambda: _write_results(ctx, references, units, start, prepared), w)


def _profile(ctx: _Run, references: Mapping[str, Any], units: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """profile.csv/.md: where the run's time went, per stage (the reference evaluations, the calibration, the
    unlearning, each attack), over all methods and then per method: minutes, share of the whole, and the
    shares of training, evaluation and the rest (loading, saving). Each stage counts the time it took when
    it ran, so a resumed run's profile is the whole run's."""
    from shared.report import write_table

    timed: dict[tuple[str, str], list[Mapping[str, float] | None]] = {
        ("all", "references"): [{"total_s": r["time_s"], "train_s": 0.0, "eval_s": r["time_s"]}
                                for r in references.values()]}
    for u in units:
        for stage, t in u.get("time", {}).items():
            for method in ("all", u["method"]):
                timed.setdefault((method, stage), []).append(t)
    whole = sum(t["total_s"] for (method, _), ts in timed.items() if method == "all" for t in ts if t)
    rows = []
    for (method, stage), ts in sorted(timed.items(), key=lambda kv: kv[0][0] != "all"):
        known = [t for t in ts if t]
        if not known:
            continue
        total, train, evals = (sum(t[k] for t in known) for k in ("total_s", "train_s", "eval_s"))
        rows.append({"method": method, "stage": stage, "runs": str(len(known)) + (
                     f" (+{len(ts) - len(known)} untimed)" if len(known) < len(ts) else ""),
                     "minutes": f"{total / 60:.1f}", "share": f"{total / whole:.0%}" if whole else "",
                     "s per run": f"{total / len(known):.0f}", "training": f"{train / total:.0%}" if total else "",
                     "evaluation": f"{evals / total:.0%}" if total else "",
                     "other": f"{(total - train - evals) / total:.0%}" if total else ""})
    if rows:
        write_table(ctx.run.path / "profile", rows, title=f"Where the time went ({whole / 60:.1f} min of stages; "
                    "share: of the whole; training / evaluation / other: of the stage)")
    return rows


def _calibration_table(ctx: _Run, units: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """calibration.csv/.md: per method and seed, the budget chosen (or none) and the validation values there."""
    from shared.report import write_table

    settings = ctx.cfg.matched
    metric, *utility = settings.validation_metrics()
    rows = []
    for u in units:
        cal = u["calibration"]
        at = next((r for r in cal["rows"] if r["step"] == cal["chosen"]), None)
        rows.append({"method": u["method"], "seed": u["seed"], "steps": cal["chosen"] or "not reached",
                     metric: "" if at is None else f"{at[metric]:.3f}",
                     **{m: "" if at is None else f"{at[m]:.3f}" for m in utility},
                     "band": f"[{cal['band'][0]:.3f}, {cal['band'][1]:.3f}]",
                     "curve": " ".join(f"{r['step']}:{r[metric]:.3f}" for r in cal["rows"])})
    write_table(ctx.run.path / "calibration", rows,
                title=f"Matched efficacy: the smallest budget with {metric} within {settings.band} of "
                      f"{ctx.matched_target:.3f}" + (f" and {utility[0]} >= {settings.floor}" if utility else ""))
    return rows


# ---------------------------------------------------------------------------------------------- compare
def compare_runs(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> list[dict[str, str]]:
    """`out`/compare.csv and compare.md over finished run folders: each run's table rows with the run
    name in front (columns: the union of the runs' metrics)."""
    from shared.report import write_table

    if not paths:
        raise ConfigError("runs: expected at least one run folder")
    rows: list[dict[str, str]] = []
    for path in paths:
        summary_path = Path(path) / "summary.json"
        if not summary_path.is_file():
            raise ConfigError(f"{path}: no summary.json (not an unlearning run folder, or not finished)")
        summary = read_result(summary_path)
        if not isinstance(summary, dict) or "table" not in summary or "methods" not in summary:
            raise ConfigError(f"{path}: summary.json is not an unlearning run's (no table / methods)")
        rows += [{"run": Path(path).name, **row} for row in summary["table"]]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    rows = [{c: row.get(c, "") for c in columns} for row in rows]
    write_table(Path(out) / "compare", rows, title=title)
    return rows
