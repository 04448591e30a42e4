"""Run folders: `config.yaml`, `metrics.jsonl` (appended and flushed per record), atomic JSON
summaries, and the environment every result file records (versions, device, seed)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError, RunStateError

RUN_FILE = "run.json"  # {"kind": ...}: which command's folder this is
LOCK_FILE = ".lock"
RECORDS_KEY = "__metrics_records__"  # in a checkpoint: the metric records it agrees with


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, fsync it, then rename it over `path`: a
    reader, or a run resumed after a kill at any point, sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically (`atomic_replace`)."""
    atomic_replace(Path(path), lambda tmp: tmp.write_text(text))


def read_result(path: Path) -> Any | None:
    """A stage's result file, or None when it is missing or damaged (it is then computed again: result
    files are written atomically, so damage comes from outside, and recomputing loses nothing)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions and hardware, recorded in every result file."""
    versions = {"python": platform.python_version()}
    for package in ("samsuite", "torch", "numpy", "flwr", "transformers", "peft", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "versions": versions,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    info["device"] = device or ("cuda" if info.get("cuda") else "cpu")
    return info


def check_run_name(name: Any, field: str = "name") -> None:
    """A run name is one folder name: not empty, no path separator, not . or .., no leading dot
    (hidden), no control characters. A name=../../x must never write outside out_dir."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{field}: expected a folder name (e.g. {field}=my-run), got {name!r}")
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if bad or name in (".", "..") or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ConfigError(f"{field}: {name!r} is not a plain folder name (no '/', '\\', leading '.', '..' or "
                          f"control characters); runs are created under out_dir")


def check_out_dir(out_dir: str | Path, field: str = "out_dir") -> None:
    """`out_dir` is (or can be created as) a folder this process can write in."""
    path = Path(out_dir)
    if str(out_dir) == "":
        raise ConfigError(f"{field}: expected a folder, got an empty path")
    probe = path
    while not probe.exists():  # the nearest existing folder above decides whether it can be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == path else f" cannot be created: {probe}"
        raise ConfigError(f"{field}: {path}{where} is a file, not a folder; choose another {field}=")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its nearest existing folder {probe})"
        raise ConfigError(f"{field}: {path}{where} is not writable by this user; choose another {field}=")


class RunLock:
    """One process per run folder: an exclusive `fcntl.flock` on `<folder>/.lock`, which holds the
    holder's pid for the message. The kernel drops the lock when its holder dies, so a killed
    run's folder is taken over by the next run without any stale-lock cleanup."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._handle: Any = None

    def acquire(self) -> None:
        import fcntl

        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - held until release(); closing it unlocks
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read(64).strip() or "unknown"
                handle.close()
                raise RunStateError(
                    f"{self.path.parent}: another samsuite process (pid {holder}) is running in this folder; wait "
                    f"for it to finish (or stop it: kill {holder}), or choose another name=") from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its previous holder removed meanwhile
                break
            handle.close()
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it (see acquire's inode check)
        self._handle.close()
        self._handle = None


class RunDir:
    """A run's folder. Metrics are JSON Lines appended and flushed as they come (a killed run
    loses at most the record being written), synced to disk before every checkpoint; the
    checkpoint is one safetensors file replaced atomically, holding the number of metric records
    it agrees with. Summaries and configs are replaced atomically.

    `RunDir(path)` is a plain handle (readers, and the parts of a run inside its folder);
    `RunDir.claim(out_dir, name, kind)` is how a command takes a folder of its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._count: int | None = None  # records in metrics.jsonl, once known
        self._lock: RunLock | None = None
        self._created: list[Path] = []

    @classmethod
    def acquire(cls, out_dir: str | Path, name: str, kind: str) -> RunDir:
        """Take `out_dir/name` for a run of `kind` (train, fed, unlearn, ...) until `release()`: the
        names are checked, another kind's folder or a folder in use is refused, and the folder is
        locked. A folder created here is removed again at release if the run wrote nothing into
        it, so an invocation refused after the claim leaves no trace."""
        check_run_name(name)
        check_out_dir(out_dir)
        run = cls(Path(out_dir) / name)
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"name: {run.path} is a file, not a run folder; choose another name=")
        run._created = [p for p in (run.path, *run.path.parents) if not p.exists()]
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"out_dir: cannot create {run.path} ({err.strerror or err})") from None
        run._lock = RunLock(run.path)
        try:
            run._lock.acquire()
            run._check_kind(kind)
        except BaseException:
            run.release()
            raise
        return run

    def release(self) -> None:
        """Unlock a folder taken by `acquire` (and remove it if this run created it and left it empty)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._created and [p.name for p in self.path.iterdir()] == [RUN_FILE]:
            (self.path / RUN_FILE).unlink()  # the run wrote nothing: as if it had never started
        for folder in self._created:  # innermost first; only folders that are still empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    @classmethod
    @contextmanager
    def claim(cls, out_dir: str | Path, name: str, kind: str) -> Iterator[RunDir]:
        """`acquire` for the length of a with-block."""
        run = cls.acquire(out_dir, name, kind)
        try:
            yield run
        finally:
            run.release()

    def _check_kind(self, kind: str) -> None:
        marker = self.path / RUN_FILE
        if marker.is_file():
            try:
                found = json.loads(marker.read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != kind:
                raise RunStateError(f"{self.path}: holds a '{found or 'unknown'}' run ({marker}), not a '{kind}' run; "
                                    "choose another name=")
            return
        others = [p.name for p in self.path.iterdir() if p.name != LOCK_FILE]
        if others:
            raise RunStateError(f"{self.path}: is not a samsuite {kind} run folder (no {RUN_FILE}; it holds "
                                f"{', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}); choose another "
                                "name= or out_dir=")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(marker, json.dumps({"kind": kind, "created": stamp}) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        count = self._records_count()
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
        self._count = count + 1

    def sync_metrics(self) -> None:
        """Force metrics.jsonl to disk (before a checkpoint that must agree with it)."""
        if self.metrics_path.exists():
            with self.metrics_path.open("rb") as handle:
                os.fsync(handle.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        """All complete records. A torn last line (a kill while it was written) is left out; a
        damaged line before it is an error naming the file and the line."""
        if not self.metrics_path.exists():
            return []
        try:
            text = self.metrics_path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RunStateError(f"{self.metrics_path}: cannot be read ({err}); set resume=false to start over") from None
        complete = text.split("\n")[:-1]  # text after the last newline was being written: torn
        records = []
        for number, line in enumerate(complete, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise RunStateError(f"{self.metrics_path}, line {number}: not a JSON record (the file was damaged or "
                                    "edited); restore it, or set resume=false to start over")
            records.append(record)
        return records

    def _records_count(self) -> int:
        if self._count is None:
            self._count = len(self.metrics())
            if self.metrics_path.exists() and not self.metrics_path.read_bytes().endswith(b"\n") \
                    and self.metrics_path.stat().st_size:
                self.truncate_metrics(self._count)  # drop a torn last line before appending after it
        return self._count

    def truncate_metrics(self, keep: int) -> None:
        """Keep the first `keep` records (used when resuming from an earlier checkpoint)."""
        records = self.metrics()[:keep] if keep else []  # a fresh start reads nothing (the file may be damaged)
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, default=str) + "\n" for r in records))
        self._count = len(records)

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        write_json(path, obj)
        return path

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: dict[str, Any], name: str = "checkpoint") -> None:
        """Checkpoint `state` (`shared.checkpoint`) together with the number of metric records
        logged so far, after syncing them: resuming from it never loses or repeats a record."""
        from shared.checkpoint import save_checkpoint

        self.sync_metrics()
        save_checkpoint(self.path / f"{name}.safetensors", {**state, RECORDS_KEY: self._records_count()})

    def load_checkpoint(self, name: str = "checkpoint",
                        check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """The last checkpoint (None if there is none), with metrics.jsonl cut back to the records
        it agrees with, once `check(state)` (the caller's "same config?") has not raised: a refused
        resume changes nothing. A damaged checkpoint, or metrics with fewer records than it, is an
        error that names the file."""
        from shared.checkpoint import load_checkpoint

        path = self.path / f"{name}.safetensors"
        state = load_checkpoint(path)
        if state is None:
            return None
        expected = state.pop(RECORDS_KEY, None)
        if not isinstance(expected, int):
            raise RunStateError(f"{path}: has no record count (not a samsuite checkpoint, or an older one's); "
                                "set resume=false to start over")
        found = len(self.metrics())
        if found < expected:
            raise RunStateError(
                f"{self.metrics_path}: holds {found} complete records but the checkpoint {path.name} was saved after "
                f"{expected}; records were lost or removed. Restore the file, or set resume=false to start over")
        if check is not None:
            check(state)
        self.truncate_metrics(expected)
        return state

    def remove_checkpoint(self, name: str = "checkpoint") -> None:
        (self.path / f"{name}.safetensors").unlink(missing_ok=True)
