"""A Flower Deployment Engine on this machine: one SuperLink and S SuperNodes as separate
processes on 127.0.0.1, the app run through them, and every process stopped again
(`samsuite fed deploy`, the deployment tests and `samsuite bench fed --deploy`).

Everything lives in <out_dir>/.deploy-<name>/: a private FLWR_HOME (its config.toml names the
SuperLink as the connection "deploy"), the partitions (`fedsam.partitions`, exported once per
split), the run config given to `flwr run`, and one log per process. Ports are free ones, bound
to 127.0.0.1 only. Each process is started in its own session, and stopped through its process
group (its pid), which also ends the SuperExec and app processes it started; nothing is stopped
by name. `flwr run --stream` exits 0 when the ServerApp fails, so the run's status is read back
with `flwr ls`, and a failed run is a DeploymentError carrying the ServerApp's last log lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO, Any

from fedsam.config import FedConfig
from fedsam.messages import NODE_WAIT_KEY, NULL, PARTITION_DIR, RELAY_KEYS, ROUND_TIMEOUT_KEY, relay_seconds
from fedsam.partitions import export_partitions, split_settings
from shared.config import ConfigError
from shared.errors import RunError

CONNECTION = "deploy"  # the SuperLink's name in the private config.toml
START_TIMEOUT_S = 60.0  # for the SuperLink to listen
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL after this
APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]


class DeploymentError(RunError):
    """The deployed run failed, or a process of the deployment did."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_config_of(cfg: FedConfig, **relay: float) -> dict[str, Any]:
    """`cfg` as Flower's run config (the inverse of `fedsam.messages.fed_config_from_run_config`),
    plus the relay's keys (round_timeout -> round-timeout, ...)."""
    out: dict[str, Any] = {}
    for name, value in asdict(cfg).items():
        key = name.replace("_", "-")
        if isinstance(value, dict):
            out.update({f"{key}.{option}": option_value for option, option_value in value.items()})
        else:
            out[key] = NULL if value is None else value
    out.update({key.replace("_", "-"): float(value) for key, value in relay.items()})
    return out


def check_declared(run_config: Mapping[str, Any], declared: set[str]) -> None:
    """Flower refuses run-config keys that pyproject.toml does not declare: say which, early."""
    unknown = sorted(set(run_config) - declared)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: Flower's run config only takes the keys declared in "
                          "[tool.flwr.app.config] of pyproject.toml; declare these option keys there to deploy them")


def declared_keys() -> set[str]:
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    config, _ = load_and_validate(APP_DIR / "pyproject.toml")
    return set(flatten_dict(config["tool"]["flwr"]["app"]["config"]))


def _toml(run_config: Mapping[str, Any]) -> str:
    """A flat run config as TOML lines (json quoting is valid TOML for these strings and numbers)."""
    lines = []
    for key, value in run_config.items():
        shown = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
        lines.append(f'"{key}" = {shown}')
    return "\n".join(lines) + "\n"


class LocalDeployment:
    """SuperLink + `supernodes` SuperNodes on 127.0.0.1 for `cfg`, as a context manager:
    `with LocalDeployment(cfg, 3) as dep: dep.run()`. SuperNode k serves the nodes
    k, k+S, ... (node-config partition-id=k num-partitions=S) from the exported partitions."""

    def __init__(self, cfg: FedConfig, supernodes: int, *, round_timeout: float = RELAY_KEYS[ROUND_TIMEOUT_KEY],
                 node_wait: float = RELAY_KEYS[NODE_WAIT_KEY], echo: IO[str] | None = None) -> None:
        if isinstance(supernodes, bool) or not isinstance(supernodes, int) or not 1 <= supernodes <= cfg.num_nodes:
            raise ConfigError(f"supernodes: expected an integer in [1, num_nodes={cfg.num_nodes}], got {supernodes!r}")
        for key, value in ((ROUND_TIMEOUT_KEY, round_timeout), (NODE_WAIT_KEY, node_wait)):
            relay_seconds({key: value}, key)  # the relay's own check, before anything starts
        self.cfg, self.supernodes, self.echo = cfg, supernodes, echo
        # the ServerApp runs in the SuperLink's folder: relative paths would land there, so pass them absolute
        paths = {"out_dir": str(Path(cfg.out_dir).resolve()),
                 **({"data_dir": str(Path(cfg.data_dir).resolve())} if cfg.data_dir is not None else {})}
        self.run_config = run_config_of(replace(cfg, **paths), round_timeout=round_timeout, node_wait=node_wait)
        check_declared(self.run_config, declared_keys())
        self.folder = Path(cfg.out_dir).resolve() / f".deploy-{cfg.name}"
        self.home = self.folder / "flwr_home"
        self.partitions = self.folder / f"partitions-{hashlib.sha256(json.dumps(split_settings(cfg)).encode()).hexdigest()[:12]}"
        self.port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    # ------------------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it while it runs
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _log_tail(self, name: str, lines: int = 15) -> str:
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_process(self, name: str) -> None:
        """SIGTERM to the process group of `name`, SIGKILL after STOP_TIMEOUT_S; by its pid only."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
        except ProcessLookupError:
            pass

    def start(self) -> None:
        """Export the partitions (once per split), start the SuperLink, wait until it listens,
        start the SuperNodes and write the connection into the private config.toml."""
        self.folder.mkdir(parents=True, exist_ok=True)
        export_partitions(self.cfg, self.partitions)
        self.port = free_port()
        self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.procs["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink exited at start:\n{self._log_tail('superlink')}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not listen on 127.0.0.1:{self.port} within "
                                      f"{START_TIMEOUT_S:.0f} s:\n{self._log_tail('superlink')}")
            time.sleep(0.2)
        for k in range(self.supernodes):
            self.start_supernode(k)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def start_supernode(self, k: int) -> None:
        node_config = (f"partition-id={k} num-partitions={self.supernodes} "
                       f"{PARTITION_DIR}={json.dumps(str(self.partitions))}")
        self._spawn(f"supernode-{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                       "--port", str(free_port()), "--node-config", node_config])

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes first."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop_process(name)

    def __enter__(self) -> LocalDeployment:  # noqa: PYI034 - not subclassed
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ runs
    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.folder, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def submit(self) -> int:
        """Start the app on the SuperLink; returns the run id."""
        config_file = self.folder / "run_config.toml"
        config_file.write_text(_toml(self.run_config))
        done = self.flwr("run", str(APP_DIR), CONNECTION, "--format", "json", "--run-config", str(config_file),
                         timeout=START_TIMEOUT_S * 5)
        try:
            return int(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"`flwr run` did not start the app:\n{done.stdout}{done.stderr}") from None

    def status(self, run_id: int) -> dict[str, Any]:
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            return dict(json.loads(done.stdout)["runs"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            raise DeploymentError(f"`flwr ls` could not read run {run_id}:\n{done.stdout}{done.stderr}") from None

    def wait(self, run_id: int) -> dict[str, Any]:
        """Stream the run's log (to `echo` and <folder>/run-<id>.log) until it finishes; returns
        its `flwr ls` record. A run that did not complete is a DeploymentError."""
        log_path = self.folder / f"run-{run_id}.log"
        with open(log_path, "w") as log:
            stream = subprocess.Popen(["flwr", "log", str(run_id), CONNECTION, "--stream"], env=self.env,
                                      cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert stream.stdout is not None
            for line in stream.stdout:
                log.write(line)
                log.flush()
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()
            stream.wait()
        record = self.status(run_id)
        while not str(record.get("status", "")).startswith("finished"):  # the stream may end a moment early
            time.sleep(0.5)
            record = self.status(run_id)
        if record["status"] != "finished:completed":
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-12:])
            raise DeploymentError(f"the deployed run {run_id} ended {record['status']} "
                                  f"({record.get('status-details', '')}); the ServerApp's last lines:\n{tail}")
        return record

    def run(self) -> dict[str, Any]:
        """Run the app to its end; returns the run's summary (summary.json of the run folder)."""
        record = self.wait(self.submit())
        summary = json.loads((Path(self.cfg.out_dir).resolve() / str(self.cfg.name) / "summary.json").read_text())
        summary["deployment"] = {k: record.get(k) for k in ("run-id", "status", "elapsed", "network-traffic")}
        return summary


def deploy(cfg: FedConfig, supernodes: int, *, round_timeout: float = RELAY_KEYS[ROUND_TIMEOUT_KEY],
           node_wait: float = RELAY_KEYS[NODE_WAIT_KEY], echo: IO[str] | None = sys.stdout) -> dict[str, Any]:
    """`samsuite fed deploy`: run `cfg` on a fresh local deployment and stop it again."""
    if cfg.engine != "flower":  # the run records the engine it ran on
        cfg = replace(cfg, engine="flower")
    with LocalDeployment(cfg, supernodes, round_timeout=round_timeout, node_wait=node_wait, echo=echo) as dep:
        return dep.run()
