"""Suite-wide pytest setup: the `slow` and `gpu` markers (`gpu` tests skip without CUDA), one torch thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
