"""Suite-wide pytest setup: the `slow` and `gpu` markers (`gpu` tests skip without CUDA), one torch thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shared.threads import torch_threads


@dataclass
class CliResult:
    """What `samsuite ARGS` did in-process: its exit code and everything it printed (stdout + stderr)."""

    exit_code: int
    output: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """`cli("fed", "run", "lr=inf")` runs the real entry point (`experiments.cli.main`: its error
    handling and exit codes included) in this process."""
    from experiments.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out + err)

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: a test that needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> object:
    """The tests train tiny models, for which one thread is fastest; more thrash on a busy 2-core
    machine (a local update measured 33x slower with 2 threads there)."""
    with torch_threads(1):
        yield


# ------------------------------------------------------------------ a tiny unlearning benchmark
@pytest.fixture(scope="session")
def unlearn_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-person toy benchmark saved to disk, with tiny target/retrain models trained for it (seconds)."""
    from suite_fixtures import TINY_MODEL

    from unlearn.benchmarks import build_toy, save_benchmark
    from unlearn.prepare import prepare

    root = tmp_path_factory.mktemp("bench")
    bench = build_toy(0, n_entities=10, bios_per_entity=1, qa_drills=1, mc_drills=0, n_icl=1)
    texts = {split: list(bench.corpora[split]["text"]) for split in ("forget", "retain")}
    prepare(root / "models", overrides=TINY_MODEL, texts=texts)
    bench.models = {"target": str(root / "models" / "target"), "retrain": str(root / "models" / "retrain")}
    return save_benchmark(bench, root / "toy-small")
