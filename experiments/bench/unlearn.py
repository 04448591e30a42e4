"""`samsuite bench unlearn`: what smoothing and NPO's reference cache cost, as ratios from one run.

1. Step time of NPO+SAM / NPO (NPO with the retain term, gamma = 1): SAM on the forget loss adds one
   forward-backward pass to NPO's two (forget at w, forget at w + e, retain at w), so 1.5 is the
   floor and the target is <= 1.6.
2. Step time of NPO recomputing the reference log-probs every step with a frozen copy of the model
   (what open-unlearning's NPO does) / NPO reading them from the cache `setup` fills once.
3. Peak memory of NPO+SAM / NPO (target <= 1.1: the perturbation is applied in place, no model copy).

A step is exactly what the training loop runs: `smoother.backward` (all passes) and the optimizer
step, on the same batch of embedded-benchmark texts (forget and retain), full fine-tuning with AdamW.

Timing: every candidate trains its own copy of the same model; after a warm-up they run round-robin
(order rotated each round, `experiments.bench.optim`'s timer), ratio = median / median of NPO.

Peak memory: each candidate alone, over its whole life (model copy, optimizer, reference cache,
two steps), so weights, gradients, Adam moments, SAM's buffer and activations all count. On CUDA:
`torch.cuda.max_memory_allocated` minus what was allocated before. On CPU, where torch keeps no peak
statistics, the same quantity from torch's profiler: with `profile_memory=True` the CPU allocator
reports every allocation and free inside the profiled window with the running total of the bytes
it allocated there ("Total Allocated" in the trace); the peak of that total is the candidate's peak
(allocator-exact: no RSS noise from Python, the heap or other processes).

Analytic view of (3): between its two passes SAM needs w and w + e at once, but the forget gradient
at w is dead by then, so w + e is built in its tensors (shared/sam/base.py): during the pass at
w + e SAM holds w, w + e and Adam's moments, exactly as many weight-sized tensors as NPO holds
during its retain pass (w, the forget gradient, the moments). The peaks can differ only inside the
backward at w + e, where the new gradients appear while the activations are freed: in a transformer
at these batch sizes the activations freed outweigh the gradients produced, and the ratio is ~1.0;
with tiny batches or gradient checkpointing of a large model the excess is at most one weight-sized
tensor (the old backup-buffer bound: 5/4 = 1.25 of the static memory with AdamW).
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from experiments.bench import console as bench_console
from experiments.bench.optim import _time_round_robin
from shared.report import markdown_table
from shared.runio import atomic_write_text, environment, write_json
from shared.threads import torch_threads
from unlearn.benchmarks import build_toy
from unlearn.data import make_micro_batches, tokenize_texts
from unlearn.objectives import OBJECTIVES, ObjectiveContext, SetupData, sequence_logprob
from unlearn.objectives.npo import REF_KEY
from unlearn.smoothers import SMOOTHERS, StepTerms
from unlearn.train import UnlearnConfig

NPO, SAM, RECOMPUTE = "npo", "npo+sam", "npo, reference recomputed"
TARGETS = {"sam_step_ratio": 1.6, "sam_memory_ratio": 1.1}
FULL = {"hidden": 256, "layers": 4, "batch_size": 8, "max_length": 128, "warmup": 2, "rounds": 15}
QUICK = {"hidden": 32, "layers": 2, "batch_size": 2, "max_length": 32, "warmup": 1, "rounds": 3}


@dataclass
class Candidate:
    """One way of taking an NPO step; `key` and `step` as `_time_round_robin` wants them."""

    key: str
    model: nn.Module
    step: Callable[[], None]


def _tokenizer(quick: bool) -> Any:
    """SmolLM2's (vocabulary 49,152: the LM head's share of memory as in real models); quick mode a
    512-token BPE trained on the toy texts (loading SmolLM2's from its GGUF takes seconds)."""
    if quick:
        from unlearn.prepare import benchmark_texts, train_tokenizer

        texts = benchmark_texts(0)
        return train_tokenizer(texts["forget"] + texts["retain"], vocab_size=512, max_length=512)
    from unlearn.models import smollm2_tokenizer

    return smollm2_tokenizer()


def _model(tokenizer: Any, hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _recomputing(forget_loss: Callable, ref_model: nn.Module) -> Callable:
    """NPO's forget loss with log p_ref(y|x) recomputed from `ref_model` at every call (the cache
    entries of the batch are overwritten first, so the loss itself is the same function)."""

    def loss(model: nn.Module, batch: Any, ctx: ObjectiveContext) -> torch.Tensor:
        with torch.no_grad():
            logp = sequence_logprob(ref_model, batch)
        ctx.cache[REF_KEY][batch.index.cpu()] = logp.double().cpu()
        return forget_loss(model, batch, ctx)

    return loss


def _candidate(key: str, init: nn.Module, data: dict[str, Any], settings: dict[str, Any]) -> Candidate:
    """A fresh copy of `init` with its optimizer and reference cache, and its step."""
    model = copy.deepcopy(init).train()
    cfg = UnlearnConfig(objective="npo", smoother="sam" if key == SAM else "none", lr=1e-5, gamma=1.0, beta=0.1,
                        rho=0.01, batch_size=settings["batch_size"], max_length=settings["max_length"])
    objective = OBJECTIVES.get("npo")
    ctx = ObjectiveContext(cfg)
    objective.setup(model, ctx, SetupData(data["forget"], data["retain"]))
    forget_loss = objective.forget
    if key == RECOMPUTE:
        ref_model = copy.deepcopy(init).eval().requires_grad_(False)
        forget_loss = _recomputing(forget_loss, ref_model)
    smoother = SMOOTHERS.get(cfg.smoother)(cfg)
    opt = smoother.make_optimizer([p for p in model.parameters() if p.requires_grad])
    terms = StepTerms(forget=lambda pair: forget_loss(model, pair[0], ctx),
                      retain=lambda pair: objective.retain(model, pair[1], ctx), gamma=cfg.gamma)
    rows = list(range(settings["batch_size"]))
    pairs = list(zip(make_micro_batches(data["forget"], rows, 1), make_micro_batches(data["retain"], rows, 1)))
    count = iter(range(1, 10**9))

    def step() -> None:
        smoother.backward(opt, pairs, terms, next(count))
        opt.step()

    return Candidate(key, model, step)


def _cpu_peak(fn: Callable[[], None]) -> int:
    """Peak bytes the CPU allocator had allocated inside `fn` (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def _peak_memory(key: str, init: nn.Module, data: dict[str, Any], settings: dict[str, Any], device: torch.device) -> int:
    """Peak bytes of one candidate over its life: built, two steps, dropped."""

    def life() -> None:
        cand = _candidate(key, init, data, settings)
        for _ in range(2):
            cand.step()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        life()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak(life)


def _data(tokenizer: Any, settings: dict[str, Any], seed: int, device: torch.device) -> dict[str, Any]:
    toy = build_toy(seed)
    n = settings["batch_size"]
    return {split: {k: v.to(device) for k, v in tokenize_texts(tokenizer, list(toy.corpora[split]["text"][:n]),
                                                                settings["max_length"]).items()}
            for split in ("forget", "retain")}


def _table(result: dict[str, Any]) -> Table:
    table = Table(title="NPO step variants: time and peak memory, one run")
    for column in ("candidate", "median step (s)", "time / NPO", "peak memory (MiB)", "memory / NPO"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for key, row in result["candidates"].items():
        table.add_row(key, f"{row['median_step_s']:.4f}", f"{row['time_ratio']:.3f}", f"{row['peak_mib']:.1f}",
                      f"{row['memory_ratio']:.3f}")
    return table


def _markdown(result: dict[str, Any]) -> str:
    rows = [{"candidate": k, "median step (s)": f"{r['median_step_s']:.4f}", "time / NPO": f"{r['time_ratio']:.3f}",
             "peak memory (MiB)": f"{r['peak_mib']:.1f}", "memory / NPO": f"{r['memory_ratio']:.3f}"}
            for k, r in result["candidates"].items()]
    checks = [{"target": c["name"], "bound": c["bound"], "value": round(c["value"], 3), "met": "yes" if c["met"] else "NO"}
              for c in result["targets"]]
    return ("**NPO step variants (time and peak memory, one run)**\n\n" + markdown_table(rows) + "\n"
            + markdown_table(checks) + f"\n{result['config']['memory_method']}\n")


def run(out_dir: Path | None = None, *, quick: bool = False, seed: int = 0, threads: int | None = 1,
        device: str = "cpu") -> dict[str, Any]:
    """Time and measure the three candidates; print a table and the JSON, write unlearn.json and
    unlearn.md to `out_dir` if given, and return the result. `quick`: a few seconds, for tests (its
    ratios are too noisy to judge targets by)."""
    settings = QUICK if quick else FULL
    dev = torch.device(device)
    start = time.perf_counter()
    with torch_threads(threads):
        tokenizer = _tokenizer(quick)
        init = _model(tokenizer, settings["hidden"], settings["layers"], seed).to(dev)
        data = _data(tokenizer, settings, seed, dev)
        keys = (NPO, SAM, RECOMPUTE)
        peaks = {key: _peak_memory(key, init, data, settings, dev) for key in keys}
        candidates = [_candidate(key, init, data, settings) for key in keys]
        times = _time_round_robin(candidates, settings["warmup"], settings["rounds"], 1)
        env = environment(str(dev))
    medians = {key: statistics.median(times[key]) for key in keys}
    rows = {key: {"median_step_s": medians[key], "time_ratio": medians[key] / medians[NPO], "samples": len(times[key]),
                  "peak_bytes": peaks[key], "peak_mib": peaks[key] / 2**20, "memory_ratio": peaks[key] / peaks[NPO]}
            for key in keys}
    targets = [
        {"name": "NPO+SAM step time / NPO step time", "bound": TARGETS["sam_step_ratio"],
         "value": rows[SAM]["time_ratio"]},
        {"name": "NPO+SAM peak memory / NPO peak memory", "bound": TARGETS["sam_memory_ratio"],
         "value": rows[SAM]["memory_ratio"]},
    ]
    for check in targets:
        check["met"] = check["value"] <= check["bound"]
    params = sum(p.numel() for p in init.parameters())
    result = {
        "benchmark": "unlearn",
        "config": {
            "quick": quick, "seed": seed, **settings, "vocab_size": len(tokenizer), "parameters": params,
            "optimizer": "adamw (full fine-tuning)", "npo": {"beta": 0.1, "gamma": 1.0}, "sam": {"rho": 0.01},
            "time_method": "round-robin interleaved, order rotated each round; ratio = median / median(npo)",
            "memory_method": (
                "peak bytes of each candidate alone over its life (model copy, optimizer, reference cache, two "
                "steps): " + ("torch.cuda.max_memory_allocated minus the bytes allocated before" if dev.type == "cuda"
                              else "the peak 'Total Allocated' of the CPU allocator's events in torch.profiler "
                                   "(profile_memory=True)")
            ),
        },
        "environment": env,
        "candidates": rows,
        "cache_speedup": rows[RECOMPUTE]["time_ratio"],
        "targets": targets,
        "all_targets_met": all(c["met"] for c in targets),
        "wall_s": time.perf_counter() - start,
    }
    console = bench_console()
    console.print(_table(result))
    for check in targets:
        console.print(f"{check['name']}: {check['value']:.3f} (target <= {check['bound']}) "
                      + ("[green]ok[/]" if check["met"] else "[red]MISS[/]"))
    console.print_json(data=result)
    if out_dir is not None:
        write_json(Path(out_dir) / "unlearn.json", result)
        atomic_write_text(Path(out_dir) / "unlearn.md", _markdown(result))
    return result
