"""The evaluation suite: WMDP-style multiple-choice accuracy (as lm-evaluation-harness computes it)
and MUSE's VerbMem, KnowMem and PrivLeak, on any `Benchmark`; fast enough to run inside training
loops. A metric is added by registering it in `METRICS` with the tables it needs.

Values: accuracies, ROUGE scores and AUCs are fractions; privleak is MUSE's percentage. KnowMem
(`knowmem_f`, `knowmem_r`) is the mean ROUGE-L F1, as MUSE reports it; the extra metrics
`knowmem_f_recall`, `knowmem_r_recall` (asked for by name, not in the defaults) are the mean ROUGE-L
recall of the same generations, which are made once when both are asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.registry import Registry
from shared.runio import environment
from shared.validate import check_choice, check_positive
from unlearn.distributed import World, world
from unlearn.eval.mc import MCResult, check_mc, mc_prompt, score_mc
from unlearn.eval.muse import GenerationScores, knowmem, min_k_prob, privleak, privleak_auc, verbmem

if TYPE_CHECKING:  # any object with the sections mc / muse (mappings of tables) and a name will do
    from unlearn.benchmarks import Benchmark

__all__ = [
    "BACKENDS",
    "MC_METRICS",
    "METRICS",
    "PRIVLEAK",
    "EvalError",
    "MCResult",
    "Metric",
    "ModelSpec",
    "available_metrics",
    "check_backend",
    "check_mc",
    "default_metrics",
    "evaluate",
    "evaluate_model",
    "knowmem",
    "mc_prompt",
    "metric_names",
    "min_k_prob",
    "privleak",
    "privleak_auc",
    "score_mc",
    "verbmem",
]

BACKENDS = ("ours", "lm-eval")
PRIVLEAK = "privleak"  # derived from privleak_auc and the retrained model's AUC


class EvalError(ValueError):
    """A metric that cannot be computed on this benchmark, or a bad evaluation option."""


@dataclass(frozen=True)
class Options:
    max_samples: int | None
    batch_size: int
    progress: bool
    #: results shared by the metrics of one `evaluate` call (e.g. one set of KnowMem generations for F1 and recall)
    memo: dict[Any, Any] = field(default_factory=dict)


Compute = Callable[[PreTrainedModel, PreTrainedTokenizerBase, "Benchmark", Options], float]


@dataclass(frozen=True)
class Metric:
    """A named metric: the benchmark tables it reads, as (section, key), how it is computed, and
    whether it is one of the defaults (an extra metric is computed only when asked for by name)."""

    name: str
    needs: tuple[tuple[str, str], ...]
    compute: Compute
    default: bool = True


METRICS: Registry[Metric] = Registry("metric")
ORDER: list[str] = []  # registration order: the order of the keys in every result


def register(name: str, *needs: tuple[str, str], default: bool = True) -> Callable[[Compute], Compute]:
    def decorator(compute: Compute) -> Compute:
        METRICS.register(name)(Metric(name, needs, compute, default))
        ORDER.append(name)
        return compute

    return decorator


def _table(bench: Benchmark, section: str, key: str, max_samples: int | None = None) -> Dataset:
    tables = getattr(bench, section)
    if key not in tables:
        raise EvalError(f"{bench.name}: no {section} split {key!r}; it has: {', '.join(tables) or 'none'}")
    table = tables[key]
    return table if max_samples is None else table.select(range(min(max_samples, len(table))))


def _mc_metric(split: str, formulation: str) -> Compute:
    def compute(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options) -> float:
        return score_mc(model, tokenizer, _table(bench, "mc", split), name=f"{bench.name}.mc.{split}",
                        max_samples=opts.max_samples, batch_size=opts.batch_size, progress=opts.progress,
                        formulation=formulation).acc

    return compute


#: multiple-choice metric -> its split in `Benchmark.mc` and its formulation. The lettered one is the
#: number WMDP papers report; the cloze one is the one small models (the embedded benchmark's) can pass.
MC_METRICS = {
    "forget_acc": ("forget", "letters"),
    "utility_acc": ("utility", "letters"),
    "forget_acc_cloze": ("forget", "cloze"),
    "utility_acc_cloze": ("utility", "cloze"),
}
for _name, (_split, _formulation) in MC_METRICS.items():
    register(_name, ("mc", _split))(_mc_metric(_split, _formulation))


@register("verbmem_f", ("muse", "verbmem_forget"))
def _verbmem_f(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options) -> float:
    table = _table(bench, "muse", "verbmem_forget", opts.max_samples)
    return verbmem(model, tokenizer, table["prompt"], table["gt"], batch_size=opts.batch_size,
                   progress=opts.progress).mean


def _knowmem_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options,
                    which: str) -> GenerationScores:
    """KnowMem's generations and ROUGE-L on one split, made once per `evaluate` call."""
    key = ("knowmem", which)
    if key not in opts.memo:
        qa = _table(bench, "muse", f"knowmem_{which}_qa", opts.max_samples)
        icl = _table(bench, "muse", f"knowmem_{which}_qa_icl")  # the prompt's examples: never cut
        opts.memo[key] = knowmem(model, tokenizer, qa["question"], qa["answer"], icl["question"], icl["answer"],
                                 batch_size=opts.batch_size, progress=opts.progress)
    return opts.memo[key]


def _knowmem_metric(which: str, recall: bool) -> Compute:
    def compute(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options) -> float:
        scores = _knowmem_scores(model, tokenizer, bench, opts, which)
        return scores.mean_recall if recall else scores.mean

    return compute


#: KnowMem: mean ROUGE-L F1 (MUSE's number) under MUSE's names, then the mean recall as extra metrics.
for _suffix, _recall in (("", False), ("_recall", True)):
    for _short, _which in (("f", "forget"), ("r", "retain")):
        register(f"knowmem_{_short}{_suffix}", ("muse", f"knowmem_{_which}_qa"), ("muse", f"knowmem_{_which}_qa_icl"),
                 default=not _recall)(_knowmem_metric(_which, _recall))


@register("privleak_auc", ("muse", "privleak_forget"), ("muse", "privleak_holdout"))
def _privleak_auc(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options) -> float:
    forget = _table(bench, "muse", "privleak_forget", opts.max_samples)["text"]
    holdout = _table(bench, "muse", "privleak_holdout", opts.max_samples)["text"]
    return privleak_auc(model, tokenizer, forget, holdout, batch_size=opts.batch_size, progress=opts.progress)


#: A validation split holds, for some tables, a twin "<key>_val" with rows of the same kind that the reported
#: metrics never read (the toy: its questions in a fourth wording; WMDP, MUSE: questions held out by
#: `unlearn.matched.split_validation`). These are the tables that can have one: every multiple-choice table,
#: and MUSE's question and memorisation tables (not the in-context examples, nor PrivLeak's texts).
VALIDATION = "_val"
SPLITTABLE = {"mc": None, "muse": ("verbmem_forget", "knowmem_forget_qa", "knowmem_retain_qa")}


def splittable(section: str, key: str) -> bool:
    keys = SPLITTABLE.get(section, ())
    return not key.endswith(VALIDATION) and (keys is None or key in keys)


def _on_validation(metric: Metric) -> Compute:
    """`metric` computed on the validation twins of its tables, under the test tables' names."""
    def compute(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, opts: Options) -> float:
        view = dataclasses.replace(bench, **{
            section: {key: getattr(bench, section)[key + VALIDATION if splittable(section, key) else key]
                      for section_, key in metric.needs if section_ == section}
            for section in {section for section, _ in metric.needs}})
        # KnowMem's generations are memoised per split: the validation ones under their own memo
        mine = dataclasses.replace(opts, memo=opts.memo.setdefault(VALIDATION, {}))
        return metric.compute(model, tokenizer, view, mine)

    return compute


#: every metric with a splittable table, on the validation split: extra metrics, asked for by name, which
#: calibrations read (`unlearn.matched`) and the reported metrics never do
VALIDATION_METRICS = [name + VALIDATION for name in list(ORDER)
                      if any(splittable(section, key) for section, key in METRICS.get(name).needs)]
for _name in VALIDATION_METRICS:
    _metric = METRICS.get(_name[: -len(VALIDATION)])
    register(_name, *[(section, key + VALIDATION if splittable(section, key) else key)
                      for section, key in _metric.needs], default=False)(_on_validation(_metric))


def metric_names() -> list[str]:
    return [*ORDER, PRIVLEAK]


def available_metrics(bench: Benchmark, retrain_auc: float | None = None) -> list[str]:
    """Every metric whose tables the benchmark has, extra metrics included (+ privleak when the
    retrained model's AUC is known)."""
    names = [n for n in ORDER if all(key in getattr(bench, section) for section, key in METRICS.get(n).needs)]
    return names + ([PRIVLEAK] if retrain_auc is not None and "privleak_auc" in names else [])


def default_metrics(bench: Benchmark, retrain_auc: float | None = None) -> list[str]:
    """Every default metric whose tables the benchmark has (+ privleak when the retrained model's AUC is known)."""
    return [n for n in available_metrics(bench, retrain_auc) if n == PRIVLEAK or METRICS.get(n).default]


def _check_metrics(metrics: Sequence[str], retrain_auc: float | None, has_retrain: bool = False) -> list[str]:
    if isinstance(metrics, str) or not metrics:
        raise EvalError(f"metrics: expected a non-empty list of {', '.join(metric_names())}, got {metrics!r}")
    for name in metrics:
        if name != PRIVLEAK:
            METRICS.get(name, field="metrics")
    if PRIVLEAK in metrics and retrain_auc is None and not has_retrain:
        raise EvalError("metrics: privleak needs the retrained model's privleak AUC (retrain_auc; on the command "
                        "line: --retrain PATH)")
    return list(dict.fromkeys(metrics))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    *,
    metrics: Sequence[str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    retrain_auc: float | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """The requested metrics (default: every default metric the benchmark supports) of `model`, in a
    fixed key order: forget_acc, utility_acc, forget_acc_cloze, utility_acc_cloze, verbmem_f, knowmem_f,
    knowmem_r, knowmem_f_recall, knowmem_r_recall, privleak_auc, privleak. `max_samples` keeps the first
    N rows of every evaluated split (not of the in-context examples). The validation versions of the
    metrics (forget_acc_val, knowmem_f_val, ...: `VALIDATION_METRICS`) come last, when asked for by name."""
    check_positive("batch_size", batch_size)
    if max_samples is not None:
        check_positive("max_samples", max_samples)
    wanted = _check_metrics(default_metrics(benchmark, retrain_auc) if metrics is None else metrics, retrain_auc)
    opts = Options(max_samples, batch_size, progress and world().main)
    to_compute = [n for n in ORDER if n in wanted or (n == "privleak_auc" and PRIVLEAK in wanted)]
    out = {}
    bar = tqdm(to_compute, desc="metrics", unit="metric", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        out[name] = METRICS.get(name).compute(model, tokenizer, benchmark, opts)
    if PRIVLEAK in wanted:
        out[PRIVLEAK] = privleak(out["privleak_auc"], retrain_auc)
    return out


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("lm_eval", "rouge-score", "scikit-learn", "accelerate", "gguf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model (see `unlearn.models.load_model`)."""

    spec: str
    dtype: str = "auto"
    device: str = "cpu"
    gguf_file: str | None = None
    adapter: str | None = None
    trust_remote_code: bool = False

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from unlearn.models import load_model

        return load_model(self.spec, dtype=self.dtype, device=self.device, gguf_file=self.gguf_file,
                          adapter=self.adapter, trust_remote_code=self.trust_remote_code)


def check_backend(backend: str, w: World | None = None) -> None:
    """The backend, and whether it runs on the processes `w` (default: this run's)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "lm-eval" and (w or world()).size > 1:
        raise EvalError("backend: lm-eval runs in one process here; use backend=ours on several processes (it "
                        "scores multiple choice as lm-eval does, tests/unlearn/test_eval_lmeval.py) or run one process")


def evaluate_model(
    model: ModelSpec,
    benchmark: str,
    *,
    backend: str = "ours",
    metrics: Sequence[str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    retrain: ModelSpec | None = None,
    paths: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
    subsets: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """`samsuite unlearn eval`: load the benchmark and the model, evaluate, and return the record
    (model spec, benchmark, config, environment and versions, metrics). With `retrain`, the
    retrained model's privleak AUC is measured first and privleak reported; with backend "lm-eval"
    the multiple-choice accuracies come from lm-evaluation-harness itself."""
    from unlearn.benchmarks import load_benchmark

    check_backend(backend)
    check_positive("batch_size", batch_size)
    if max_samples is not None:
        check_positive("max_samples", max_samples)
    if metrics is not None:
        metrics = _check_metrics(metrics, None, has_retrain=retrain is not None)
    start = time.perf_counter()
    bench = load_benchmark(benchmark, cache_dir=cache_dir, paths=paths, subsets=subsets, seed=seed)
    retrain_auc = None
    if retrain is not None:
        retrain_model, retrain_tokenizer = retrain.load()
        retrain_auc = evaluate(retrain_model, retrain_tokenizer, bench, metrics=["privleak_auc"],
                               max_samples=max_samples, batch_size=batch_size, progress=progress)["privleak_auc"]
        del retrain_model
    wanted = default_metrics(bench, retrain_auc) if metrics is None else list(metrics)
    lm, tokenizer = model.load()
    # lm-eval runs its own WMDP/MMLU template, i.e. the lettered formulation; cloze stays ours
    mc_wanted = [n for n in wanted if MC_METRICS.get(n, ("", ""))[1] == "letters"] if backend == "lm-eval" else []
    rest = [n for n in wanted if n not in mc_wanted]
    values = evaluate(lm, tokenizer, bench, metrics=rest, max_samples=max_samples, batch_size=batch_size,
                      retrain_auc=retrain_auc, progress=progress) if rest else {}
    if mc_wanted:
        from unlearn.eval.lmeval import lm_eval_mc

        splits = {MC_METRICS[n][0]: _table(bench, "mc", MC_METRICS[n][0]) for n in mc_wanted}
        results = lm_eval_mc(lm, tokenizer, splits, batch_size=batch_size, max_samples=max_samples)
        values |= {n: results[MC_METRICS[n][0]].acc for n in mc_wanted}
    return {
        "model": asdict(model),
        "benchmark": {"name": bench.name, "subsets": list(subsets) if subsets else None, "paths": dict(paths or {}),
                      "models": dict(bench.models)},
        "config": {"backend": backend, "metrics": wanted, "max_samples": max_samples, "batch_size": batch_size,
                   "seed": seed, "retrain": asdict(retrain) if retrain else None},
        "environment": environment(model.device) | {"eval_versions": _versions(), "processes": world().size},
        "retrain_privleak_auc": retrain_auc,
        "metrics": {n: values[n] for n in metric_names() if n in values},
        "wall_s": time.perf_counter() - start,
    }
