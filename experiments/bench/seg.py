"""`samsuite bench seg`: the speed of UU-Mamba's parts, as ratios measured in one run.

1. The selective scan (`seg.mamba.selective_scan`: chunked, a Blelloch scan inside each chunk) against
   the sequential reference (`selective_scan_ref`, one step per position, as mamba_ssm's), forward
   and forward + backward, at the size of the default run's largest Mamba layer: the first encoder
   stage of its slices (`SegConfig.size` squared tokens: 1,024), d_inner = 2 x base_channels (the
   expansion 2), d_state 16, the default batch of 8.
   Target: >= 10x on CPU. The outputs and gradients are compared too (largest difference relative to
   each tensor's largest entry, float32).
2. One SAM step against one plain SGD step of the same network on the same batch (target: at most
   the floor of 2.0: SAM takes two forward-backward passes), for U-Mamba-Enc and U-Net with the
   default run's settings, the uncertainty-weighted loss and gradient clipping as `samsuite seg run`
   takes them.

Timing: contenders run round-robin (order rotated each round) after a warm-up call, so that drift of
a shared machine hits all alike; a time is the median.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from experiments.bench import console as bench_console
from experiments.bench import round_robin
from shared.report import markdown_table
from shared.runio import atomic_write_text, environment, write_json
from shared.threads import torch_threads

SCAN_TARGET = 10.0
SAM_FLOOR = 2.0
FULL = {"repeats": 7, "batch": 8}  # at the default run's sizes (SegConfig)
QUICK = {"repeats": 2, "batch": 2, "tokens": 256, "size": 16}


def bench_scan(tokens: int, batch: int, d_inner: int, d_state: int, repeats: int, seed: int) -> dict[str, Any]:
    """Parallel vs reference selective scan, forward and forward + backward (ms, ratio, max difference)."""
    from seg.mamba import selective_scan, selective_scan_ref

    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, tokens, generator=gen)
    delta = torch.rand(batch, d_inner, tokens, generator=gen) * 0.1
    A = -torch.rand(d_inner, d_state, generator=gen) - 0.5
    B = torch.randn(batch, d_state, tokens, generator=gen)
    C = torch.randn(batch, d_state, tokens, generator=gen)
    D = torch.randn(d_inner, generator=gen)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D)]

    def forward(scan: Any) -> Any:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return scan(*inputs)
        return call

    def both(scan: Any) -> Any:
        def call() -> list[torch.Tensor]:
            out = scan(*inputs)
            return [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]
        return call

    times, results = round_robin({"parallel forward": forward(selective_scan), "reference forward":
                                  forward(selective_scan_ref), "parallel fwd+bwd": both(selective_scan),
                                  "reference fwd+bwd": both(selective_scan_ref)}, repeats)
    # float32: the largest difference of the output and each gradient, relative to that tensor's largest entry
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(results["parallel fwd+bwd"], results["reference fwd+bwd"]))
    return {
        "tokens": tokens, "batch": batch, "d_inner": d_inner, "d_state": d_state,
        **{f"{name.replace(' ', '_').replace('+', '_')}_ms": 1e3 * t for name, t in times.items()},
        "speedup_forward": times["reference forward"] / times["parallel forward"],
        "speedup_fwd_bwd": times["reference fwd+bwd"] / times["parallel fwd+bwd"],
        "max_rel_diff": diff,
    }


def bench_sam_step(size: int, batch: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    """UU-Mamba's SAM step / the same U-Mamba-Enc's SGD step (arm umamba-sgd), one row."""
    from seg.synthetic import make_slices
    from seg.train import Contender, SegConfig

    images, labels = make_slices(batch, size=size, seed=seed)
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    cfg = SegConfig(size=size, arms=["uu-mamba", "umamba-sgd"])
    contenders = {arm: Contender(cfg, arm, seed) for arm in cfg.arms}
    times = round_robin({arm: (lambda c=c: c.step(x, y)) for arm, c in contenders.items()}, repeats)[0]
    return [{"network": "U-Mamba-Enc", "size": size, "batch": batch, "sgd_step_ms": 1e3 * times["umamba-sgd"],
             "sam_step_ms": 1e3 * times["uu-mamba"], "ratio": times["uu-mamba"] / times["umamba-sgd"]}]


def markdown(result: dict[str, Any]) -> str:
    s = result["scan"]
    scan_rows = [
        {"pass": "forward", "reference ms": f"{s['reference_forward_ms']:.1f}",
         "parallel ms": f"{s['parallel_forward_ms']:.1f}", "speedup": f"{s['speedup_forward']:.1f}x"},
        {"pass": "forward + backward", "reference ms": f"{s['reference_fwd_bwd_ms']:.1f}",
         "parallel ms": f"{s['parallel_fwd_bwd_ms']:.1f}", "speedup": f"{s['speedup_fwd_bwd']:.1f}x"},
    ]
    sam_rows = [{"network": r["network"], "SGD step ms": f"{r['sgd_step_ms']:.0f}",
                 "SAM step ms": f"{r['sam_step_ms']:.0f}", "SAM / SGD": f"{r['ratio']:.2f}"} for r in result["sam"]]
    target_rows = [{"target": t["what"], "value": f"{t['value']:.3g}", "bound": t["bound"],
                    "met": "yes" if t["met"] else "**no**"} for t in result["targets"]]
    return (f"### Selective scan: {s['tokens']} tokens, batch {s['batch']}, d_inner {s['d_inner']}, d_state "
            f"{s['d_state']} (largest difference to the reference, relative to each tensor's scale: "
            f"{s['max_rel_diff']:.1e})\n\n" + markdown_table(scan_rows)
            + f"\n### SAM step against the SGD step ({result['sam'][0]['size']}x{result['sam'][0]['size']}, batch "
            f"{result['sam'][0]['batch']})\n\n" + markdown_table(sam_rows)
            + "\n### Targets\n\n" + markdown_table(target_rows)
            + f"\ntorch threads {result['config']['threads']}, seed {result['config']['seed']}, quick="
            f"{result['config']['quick']}, {result['wall_s']:.0f} s in all\n")


def run(out_dir: Path | None = None, *, quick: bool = False, seed: int = 0, threads: int | None = 1) -> dict[str, Any]:
    """Run both parts, print the tables, write `seg.json` and `seg.md` to `out_dir` if given."""
    from seg.train import SegConfig

    settings = QUICK if quick else FULL
    defaults = SegConfig()
    start = time.perf_counter()
    with torch_threads(threads):
        used = torch.get_num_threads()
        scan = bench_scan(settings.get("tokens", defaults.size**2), settings["batch"], 2 * defaults.base_channels, 16,
                          settings["repeats"], seed)
        sam = bench_sam_step(settings.get("size", defaults.size), settings["batch"], settings["repeats"], seed)
    targets = [{"what": "parallel scan / reference, forward + backward", "value": scan["speedup_fwd_bwd"],
                "bound": f">= {SCAN_TARGET:g}", "met": scan["speedup_fwd_bwd"] >= SCAN_TARGET},
               {"what": "parallel scan / reference, forward", "value": scan["speedup_forward"],
                "bound": f">= {SCAN_TARGET:g}", "met": scan["speedup_forward"] >= SCAN_TARGET}]
    targets += [{"what": f"SAM step / SGD step, {r['network']}", "value": r["ratio"], "bound": f"<= {SAM_FLOOR:g}",
                 "met": r["ratio"] <= SAM_FLOOR} for r in sam]
    result = {"benchmark": "seg", "config": {"quick": quick, "seed": seed, "threads": used, **settings},
              "environment": environment("cpu"), "scan": scan, "sam": sam, "targets": targets,
              "wall_s": time.perf_counter() - start}
    result["all_targets_met"] = all(t["met"] for t in targets)
    bench_console().print(markdown(result))
    if out_dir is not None:
        write_json(Path(out_dir) / "seg.json", result)
        atomic_write_text(Path(out_dir) / "seg.md", markdown(result))
    return result
