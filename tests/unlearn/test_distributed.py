"""Unlearning on 2 processes (gloo, CPU, FSDP2) gives the numbers of 1 process with twice the
micro-batch: the same losses at every step and the same weights (float64, to float tolerance),
for NPO, NPO+SAM, NPO+RS, NPO+WA, RMU and fine-tuning, full and LoRA (the relearning attacks' loop); a
checkpoint written by 2 processes resumes on 1; what 2 processes cannot run is refused early.

One spawn of 2 processes serves every case (about 11 s in all), so the file is in the default run.
A run of it found that NPO's reference cache was allocated with torch.empty: each rank fills only
its own rows before the ranks' caches are summed, so the other rows added whatever the memory held
(now zeros). The outcome varied from run to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from suite_fixtures import on_gloo
from train_fixtures import FORGET, RETAIN, tiny_llama, tiny_tokenizer

from shared.config import ConfigError
from unlearn.train import UnlearnConfig, unlearn

WORLD = 2
BASE = {"steps": 3, "lr": 1e-2, "batch_size": 2, "grad_accum": 2, "rho": 0.05, "max_length": 64}
RUNS: dict[str, dict[str, Any]] = {
    "npo": {"objective": "npo"},
    "npo-sam": {"objective": "npo", "smoother": "sam"},
    "npo-rs": {"objective": "npo", "smoother": "rs", "sigma": 1e-3, "rs_samples": 2},
    "npo-wa": {"objective": "npo", "smoother": "wa", "wa_start": 1, "wa_every": 1},
    "rmu": {"objective": "rmu", "rmu_layer": 1, "rmu_update_layers": [0, 1], "lr": 1e-3},
    "nll": {"objective": "nll"},
    "nll-lora": {"objective": "nll", "lora": True, "lora_r": 4},  # the LoRA fine-tuning attack's loop
    "npo-sam-ckpt": {"objective": "npo", "smoother": "sam", "gradient_checkpointing": True},
}


def config(name: str, **kw: Any) -> UnlearnConfig:
    """The run `name`: the same config on any number of processes (each takes its share of the batch)."""
    return UnlearnConfig(**{**BASE, **RUNS[name], **kw})


class Stop(Exception):
    """Ends a run as a crash would, after its step-2 checkpoint."""


def stop_at_3(model: Any, step: int) -> dict[str, float]:
    if step == 3:
        raise Stop
    return {"evaluated": float(step)}


def evaluated(model: Any, step: int) -> dict[str, float]:
    return {"evaluated": float(step)}


def train(name: str, run_dir: Path | None = None, eval_fn: Any = None, dtype: torch.dtype = torch.float64,
          **kw: Any) -> tuple[dict[str, torch.Tensor], Any]:
    tok = tiny_tokenizer()
    model = tiny_llama(tok, dtype=dtype)
    summary = unlearn(model, tok, FORGET, RETAIN, config(name, **kw), run_dir=run_dir, eval_fn=eval_fn)
    from unlearn.distributed import full

    return {n: full(p).detach().clone() for n, p in model.named_parameters()}, summary


def _worker(rank: int, run_root: str) -> dict[str, Any]:
    import torch.distributed as dist

    results: dict[str, Any] = {}
    for name in RUNS:
        params, summary = train(name, Path(run_root) / name)
        results[name] = {"params": params, "final": summary["final"]}
    # a checkpoint of 2 processes, resumed on 1 (below): the run stops after its step-2 checkpoint
    try:
        train("npo-sam", Path(run_root) / "resume", eval_fn=stop_at_3, save_every=1, eval_every=1)
    except Stop:
        pass
    # ... and resumed on 2, from a copy of the stopped run's folder
    if rank == 0:
        shutil.copytree(Path(run_root) / "resume", Path(run_root) / "resume2")
    dist.barrier()
    params, summary = train("npo-sam", Path(run_root) / "resume2", eval_fn=evaluated, save_every=1, eval_every=1)
    results["resumed2"] = {"params": params, "from": summary["resumed_from"]}
    # bf16 (FSDP's mixed-precision policy: bf16 compute, float32 reduction) on a float32 model
    results["bf16"] = {"final": train("npo-sam", dtype=torch.float32, bf16=True)[1]["final"]}
    try:
        train("npo", smoother="gp")
    except ConfigError as err:
        results["gp"] = str(err)
    try:
        train("npo", batch_size=1)  # 1 row per micro-batch cannot be shared by 2 processes
    except ConfigError as err:
        results["batch"] = str(err)
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dist")
    return {**on_gloo(_worker, WORLD, tmp, str(tmp / "runs")), "runs": tmp / "runs"}


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_give_the_one_process_numbers(two: dict[str, Any], name: str, tmp_path: Path) -> None:
    want_params, _ = train(name, tmp_path / name)
    got = two[name]["params"]
    assert set(got) == set(want_params)
    moved = max(float((want_params[n] - p).abs().max()) for n, p in tiny_llama(tiny_tokenizer()).named_parameters())
    assert moved > 1e-4  # it trained
    for n in want_params:
        torch.testing.assert_close(got[n], want_params[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    want, got_records = records(tmp_path / name), records(two["runs"] / name)  # rank 0 alone wrote the folder
    assert [r["step"] for r in got_records] == [r["step"] for r in want] == [1, 2, 3]
    for g, w in zip(got_records, want):
        for key in ("loss", "forget_loss", "grad_norm", *(("retain_loss",) if "retain_loss" in w else ())):
            assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), (name, g["step"], key)


def test_a_two_process_checkpoint_resumes_on_one(two: dict[str, Any], tmp_path: Path) -> None:
    """The 2-process run stopped after its step-2 checkpoint (whole tensors: weights, AdamW's
    moments); resumed on 1 process, or on 2, it ends where an uninterrupted 1-process run ends."""
    folder = tmp_path / "resume"
    shutil.copytree(two["runs"] / "resume", folder)
    want, _ = train("npo-sam", tmp_path / "straight", eval_fn=evaluated, save_every=1, eval_every=1)
    got, summary = train("npo-sam", folder, eval_fn=evaluated, save_every=1, eval_every=1)
    assert summary["resumed_from"] == 2 == two["resumed2"]["from"]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(two["resumed2"]["params"][n], want[n], rtol=1e-9, atol=1e-11)


def test_bf16_on_two_processes_is_one_process_bf16_to_its_precision(two: dict[str, Any]) -> None:
    """bf16 autocast on one process, FSDP's bf16 policy (bf16 weights gathered, float32 gradients
    reduced) on two: not the same rounding, so the losses agree to bf16's precision, not to the bit."""
    want = train("npo-sam", dtype=torch.float32, bf16=True)[1]["final"]
    got = two["bf16"]["final"]
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=2e-2, abs=2e-2), key


def test_what_two_processes_cannot_run_is_refused(two: dict[str, Any]) -> None:
    assert two["gp"].startswith("smoother: gp on 2 processes: its penalty needs a double backward")
    assert two["batch"] == ("batch_size: 1 row per micro-batch cannot be shared evenly by 2 processes; use a "
                            "multiple of 2, or 1 process (--nproc)")
