"""`--nproc K`: a `samsuite unlearn` command as K processes on this machine, as `torchrun
--nproc_per_node K` starts them (RANK, LOCAL_RANK, WORLD_SIZE), for users who do not want to write
the torchrun line. On several machines, use torchrun itself (`--nnodes`, a rendezvous endpoint).

Written here rather than calling torchrun's launcher: its rendezvous is a TCP store, which listens
on every interface of the machine; these processes meet through a file in a private temporary
folder (`unlearn.distributed.INIT_FILE_ENV`), and gloo's connections stay on the loopback interface.
Rank 0's output is the command's; the other ranks' output is kept aside and shown only when one of
them fails first. The first process to fail stops the others (by their pids' process groups) and its
exit code is the command's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shared.config import ConfigError
from unlearn.distributed import INIT_FILE_ENV

STOP_WAIT_S = 10.0
GRACE_S = 3.0  # after a first failure: the others' time to end on their own (the same error)


def check_nproc(nproc: int, device: str) -> None:
    """What keeps `nproc` processes from starting at all, before any work."""
    if nproc < 1:
        raise ConfigError(f"nproc: expected an integer >= 1, got {nproc}")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"nproc: this is already one of {os.environ['WORLD_SIZE']} processes (torchrun); "
                          "drop --nproc")
    import torch

    if nproc > 1 and (device.startswith("cuda") or device == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if nproc > count:
            raise ConfigError(f"nproc: {nproc} processes need {nproc} GPUs (one each); this machine has {count}")


def without_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` with its `--nproc K` (or `--nproc=K`) removed: what each process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(argv: Sequence[str], nproc: int, debug: bool = False) -> int:
    """Run `samsuite <argv>` as `nproc` processes; the exit code of the first to fail, else 0."""
    with tempfile.TemporaryDirectory(prefix="samsuite-procs-") as tmp:
        env = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               INIT_FILE_ENV: str(Path(tmp) / "init"), **({"SAMSUITE_DEBUG": "1"} if debug else {})}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(1, nproc)]
        files = [path.open("w") for path in logs]
        try:
            procs = [subprocess.Popen(
                [sys.executable, "-m", "experiments.cli", *argv], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=out, stderr=out, start_new_session=True,
            ) for rank, out in enumerate([None, *files])]
            try:
                return _wait(procs, logs)
            except KeyboardInterrupt:
                _stop(procs)
                return 130
        finally:
            for f in files:
                f.close()


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> int:
    """Wait for every process; at the first failure, let the others end on their own for a moment
    (an error every rank raises ends them all), then stop the rest and show the failed rank's output."""
    while all(p.poll() in (None, 0) for p in procs):
        if all(p.poll() == 0 for p in procs):
            return 0
        time.sleep(0.1)
    first = next(rank for rank, p in enumerate(procs) if p.poll() not in (None, 0))
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    ended = [p.poll() for p in procs]  # before the rest are stopped
    _stop(procs)
    tail = logs[first - 1].read_text(errors="replace").strip().splitlines()[-20:] if first else []
    if tail:  # rank 0 shows its own errors; another rank's, only when it failed first
        print(f"process {first} of {len(procs)} failed (exit {ended[first]}):", *tail, sep="\n", file=sys.stderr)
    return ended[0] if ended[0] not in (None, 0) else ended[first]


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop every process still running, by its process group (each started its own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
