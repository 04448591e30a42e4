"""`FedRun`: the gossip relay shared by the in-process engine and the Flower ServerApp.

It holds every node's model stacked in one tensor X (N, P) for the whole run (row i = x_i), hands
each node its row, and when a round's locally trained models y_i come back it applies the
algorithm's mixing X <- W^Q Y as a peer-to-peer network would (`fedsam.algorithms`), evaluates,
appends the round to `metrics.jsonl` and checkpoints. Nodes that fail or time out are dropped
from the round's mixing with W renormalised over the live nodes.

It also keeps each node's member state (`member_state[i]`: the local optimizer's own state, such
as SAF's buffer of past logits or MESA's EMA model; {} for SGD, SAM, ...), which the node's next
local update continues from. It stays with its node: it is never mixed and never counted in
bytes_sent (a real node would keep it on its own disk).

No randomness is carried from round to round (local updates, failures and time-varying graphs
all derive their generators from (seed, node, round)), so a checkpoint needs only X, the
non-empty member states, the round and the counters; a resumed run repeats the uninterrupted
one exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedsam.client import MemberState, evaluate_state, federated_data, initial_state
from fedsam.compare import plot_runs, run_row
from fedsam.config import FedConfig
from fedsam.mixing import consensus_distance, flatten_states, mix_, mixing_power, unflatten
from fedsam.topology import build_topology, spectral_gap, topology_for_round
from shared.config import ConfigError, to_dict
from shared.errors import Diverged
from shared.report import write_table
from shared.runio import RunDir, environment
from shared.seeding import derive_seed

if TYPE_CHECKING:
    from fedsam.partitions import FederatedData

# Config fields that do not change a run's numbers: a run may resume with other values (more rounds, say).
RESUME_NEUTRAL = ("name", "out_dir", "resume", "threads", "engine", "node_chunk", "rounds", "checkpoint_every",
                  "max_loss")
EVAL_KEYS = ("test_acc", "test_loss", "personal_acc_mean", "personal_acc_std")

#: A node's round result: (y_i, metrics), or (y_i, metrics, new member state) from an engine that
#: passes the node its member state (`local_update(..., member_state=run.member_state[i])`).
Update = (tuple[Mapping[str, Tensor], Mapping[str, float]]
          | tuple[Mapping[str, Tensor], Mapping[str, float], Mapping[str, Any]])


class FedRun:
    """One decentralized FL run. Engines call `round_tasks(r)`, train the nodes (with
    `fedsam.client.local_update`, handing node i `member_state[i]`), then `finish_round(r,
    updates, failed)`, for r from `start_round` to `rounds - 1`, and finally `finish()`. `data` overrides the data of `cfg`
    (tests, or an engine that already loaded it). The run holds its folder's lock from its
    creation to `finish()` or `close()`; use it as a context manager (`with FedRun(cfg) as run:`)."""

    def __init__(self, cfg: FedConfig, *, progress: bool = True, data: FederatedData | None = None) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.algorithm = cfg.spec
        self.q = cfg.q
        self.rounds = cfg.rounds
        self.data = federated_data(cfg) if data is None else data
        self.num_nodes = cfg.num_nodes
        if len(self.data.nodes) != self.num_nodes:
            raise ConfigError(f"num_nodes: the data has {len(self.data.nodes)} nodes but num_nodes={self.num_nodes}")
        self.device = cfg.torch_device
        init = {k: v.to(self.device) for k, v in initial_state(cfg, self.data).items()}
        self.X, self.spec = flatten_states([init] * self.num_nodes)
        self._Y = torch.empty_like(self.X)  # the round's y_i, mixed into X (no allocation per round)
        self.bytes_per_model = self.spec.nbytes
        self.member_state: list[MemberState] = [{} for _ in range(self.num_nodes)]
        #: X -> each node's accuracy on its local test split (nodes with one); an engine may replace it
        self.evaluate_nodes: Callable[[Tensor], list[float]] = self._evaluate_nodes
        self._static_adj = None if cfg.time_varying else build_topology(
            cfg.topology, self.num_nodes, cfg.seed, **cfg.topology_options)
        W0 = self.algorithm.mix(self.adjacency(0), np.ones(self.num_nodes, dtype=bool), self.q).W
        self.spectral_gap = spectral_gap(W0)
        self.spectral_gap_per_round = spectral_gap(mixing_power(W0, self.q))  # of W^Q: 1 - (1 - gap)^Q

        self.config = to_dict(cfg)
        self.bytes_sent = 0
        self.time_s = 0.0
        self.run = RunDir.acquire(cfg.out_dir, str(cfg.name), "fed")
        try:
            self.start_round = self._resume() if cfg.resume else 0
            if self.start_round == 0:  # a fresh start: no stale checkpoint may be resumed from later
                self.run.truncate_metrics(0)
                self.run.remove_checkpoint()
            self.run.write_config(self.config)
        except BaseException:
            self.run.release()
            raise
        self._next_round = self.start_round
        self._saved_round = self.start_round or None
        self._bar = tqdm(total=self.rounds, initial=self.start_round, desc=cfg.name, unit="round", disable=not progress)
        if progress:
            tqdm.write(
                f"{cfg.name}: {cfg.algorithm} ({cfg.optimizer_name}, Q={self.q}) on {self.num_nodes} nodes, "
                f"{cfg.topology}{' (time-varying)' if cfg.time_varying else ''}, spectral gap {self.spectral_gap:.4f}, "
                f"{self.spec.numel:,} parameters, {self.device}"
                + (f"; resuming after round {self.start_round}" if self.start_round else "")
            )
        self._clock = time.perf_counter()

    # ------------------------------------------------------------------ the round protocol
    def adjacency(self, r: int) -> np.ndarray:
        """The graph of round r (redrawn per round for a time-varying random topology)."""
        if self._static_adj is not None:
            return self._static_adj
        cfg = self.cfg
        return topology_for_round(cfg.topology, self.num_nodes, cfg.seed, r, time_varying=True, **cfg.topology_options)

    def simulated_failures(self, r: int) -> list[int]:
        """Nodes that the `fail_prob` simulation drops from round r (seeded by (seed, "fail", r))."""
        if self.cfg.fail_prob == 0:
            return []
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "fail", r))
        return np.flatnonzero(rng.random(self.num_nodes) < self.cfg.fail_prob).tolist()

    def round_tasks(self, r: int) -> list[tuple[int, dict[str, Tensor]]]:
        """(node, x_i) for every node asked to train in round r (all but the simulated failures).
        The states are views into X: valid until `finish_round`, to be copied by the receiver."""
        self._check_round(r)
        dropped = set(self.simulated_failures(r))
        return [(i, unflatten(self.X[i], self.spec)) for i in range(self.num_nodes) if i not in dropped]  # type: ignore[misc]

    def finish_round(self, r: int, updates: Mapping[int, Update], failed: Sequence[int] = ()) -> dict[str, Any]:
        """Mix round r's updates {node: (y_i, metrics)} into X and keep each live node's new
        member state, when an update carries one third; nodes in `failed` or without an update
        keep their x_i and member state and are left out of the mixing (W over the live nodes).
        Evaluates (every eval_every rounds and at the last), logs and checkpoints; returns the record."""
        self._check_round(r)
        bad = [i for i in [*updates, *failed] if not (isinstance(i, (int, np.integer)) and 0 <= i < self.num_nodes)]
        if bad:
            raise ValueError(f"finish_round(): unknown node ids {bad[:8]}; expected 0..{self.num_nodes - 1}")
        alive = np.zeros(self.num_nodes, dtype=bool)
        alive[list(updates)] = True
        alive[list(failed)] = False
        live = [updates[i][1] for i in np.flatnonzero(alive)]
        examples = sum(m["num_examples"] for m in live)
        train_loss = sum(m["train_loss"] * m["num_examples"] for m in live) / examples if examples else None
        if train_loss is not None and not (math.isfinite(train_loss) and abs(train_loss) <= self.cfg.max_loss):
            self.close()
            raise Diverged(f"round {r + 1}", f"mean local training loss {train_loss:.4g}, limit "
                           f"max_loss={self.cfg.max_loss:g}", self._checkpoint_path() if self._saved_round else None,
                           f"round {self._saved_round}", "Lower lr (or rho), or raise max_loss; the same command "
                           + ("resumes from it." if self._saved_round else "starts over."))
        for i in range(self.num_nodes):
            if alive[i]:
                y, _, *member = updates[i]
                self._write_row(i, y)
                if member:
                    self.member_state[i] = dict(member[0])
            else:
                self._Y[i].copy_(self.X[i])
        mixing = self.algorithm.mix(self.adjacency(r), alive, self.q)
        mix_(self._Y, mixing.W, mixing.q, out=self.X)
        self.bytes_sent += mixing.messages * self.bytes_per_model
        record: dict[str, Any] = {
            "round": r + 1,
            "lr": self.cfg.round_lr(r),
            "live": int(alive.sum()),
            "failed": np.flatnonzero(~alive).tolist(),
            "gossip_components": len(mixing.components),
            "train_loss": train_loss,
            "consensus_distance": consensus_distance(self.X),
            "bytes_sent": self.bytes_sent,
        }
        last = r + 1 == self.rounds
        record.update(self._evaluate() if last or (r + 1) % self.cfg.eval_every == 0 else dict.fromkeys(EVAL_KEYS))
        now = time.perf_counter()
        self.time_s += now - self._clock
        record.update({"compute_s": sum(m["compute_s"] for m in live), "round_s": now - self._clock, "time_s": self.time_s})
        self.run.log(record)
        self._next_round = r + 1
        if last or (r + 1) % self.cfg.checkpoint_every == 0:
            self._save_checkpoint()
            self._saved_round = r + 1
        self._clock = time.perf_counter()
        postfix = {"cd": f"{record['consensus_distance']:.3g}"}
        if record["test_acc"] is not None:
            postfix["acc"] = f"{record['test_acc']:.3f}"
        if record["failed"]:
            postfix["failed"] = str(len(record["failed"]))
        self._bar.set_postfix(postfix)
        self._bar.update()
        return record

    def finish(self) -> dict[str, Any]:
        """Write results.csv/.md (one row, as `samsuite fed compare` makes them), curves.png and
        summary.json, and release the run folder; returns the summary."""
        self._bar.close()
        try:
            return self._summarize()
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder (the run can be resumed from its last checkpoint)."""
        self._bar.close()
        self.run.release()

    def __enter__(self) -> FedRun:  # noqa: PYI034 - FedRun is not subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _summarize(self) -> dict[str, Any]:
        cfg, records = self.cfg, self.run.metrics()
        row = run_row(str(cfg.name), self.config, records)
        title = f"{cfg.algorithm} on {cfg.dataset}, {self.num_nodes} nodes, {cfg.topology}, seed {cfg.seed}"
        write_table(self.run.path / "results", [row], title=title)
        plot_runs(self.run.path / "curves.png", {str(cfg.name): records}, title=title)
        summary = {
            "results": row,
            "final": records[-1] if records else None,
            "config": self.config,
            "resolved": cfg.resolved(),
            "seed": cfg.seed,
            "spectral_gap": self.spectral_gap,
            "spectral_gap_per_round": self.spectral_gap_per_round,
            "num_params": self.spec.numel,
            "bytes_per_model": self.bytes_per_model,
            "node_train_sizes": [len(n.train_y) for n in self.data.nodes],
            "node_test_sizes": [len(n.test_y) for n in self.data.nodes],
            "environment": environment(str(self.device)),
        }
        self.run.write_json("summary.json", summary)
        return summary

    # ------------------------------------------------------------------ helpers
    def _check_round(self, r: int) -> None:
        if r != self._next_round:
            raise ValueError(f"round {r}: expected round {self._next_round} (rounds are run in order, from 0)")

    def _write_row(self, i: int, state: Mapping[str, Tensor]) -> None:
        """y_i into row i of the round buffer, checking it has the model's layout."""
        if tuple(state) != self.spec.names or tuple(v.shape for v in state.values()) != self.spec.shapes:
            raise ValueError(f"node {i}: the returned model's tensor names or shapes differ from the run's model")
        flatten_states([{k: v.to(self.device, non_blocking=True) for k, v in state.items()}], out=self._Y[i : i + 1])

    def _evaluate(self) -> dict[str, Any]:
        """test_acc/test_loss of the nodes' averaged model on the global test set; mean and std
        of each node's own model on its local test split (nodes without one are skipped)."""
        cfg, data = self.cfg, self.data
        test_loss, test_acc = evaluate_state(unflatten(self.X.mean(dim=0), self.spec), data.test_x, data.test_y, cfg, data)
        personal = np.array(self.evaluate_nodes(self.X))
        return {
            "test_acc": test_acc,
            "test_loss": test_loss,
            "personal_acc_mean": float(personal.mean()) if len(personal) else None,
            "personal_acc_std": float(personal.std()) if len(personal) else None,
        }

    def _evaluate_nodes(self, X: Tensor) -> list[float]:
        """The accuracy of node i's model X[i] on its local test split, for each node with one, one
        node after the other (the batched engine sets `evaluate_nodes` to its vectorized twin)."""
        cfg, data = self.cfg, self.data
        return [evaluate_state(unflatten(X[i], self.spec), node.test_x, node.test_y, cfg, data)[1]  # type: ignore[arg-type]
                for i, node in enumerate(data.nodes) if len(node.test_y)]

    def _checkpoint_path(self) -> Path:
        return self.run.path / "checkpoint.safetensors"

    def _comparable_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if k not in RESUME_NEUTRAL}

    def _save_checkpoint(self) -> None:
        """The run's state; member states only where a node has one (runs with SGD, SAM, ... store none)."""
        members = {str(i): state for i, state in enumerate(self.member_state) if state}
        self.run.save_checkpoint({
            "round": self._next_round, "config": self._comparable_config(), "X": self.X,
            "bytes_sent": self.bytes_sent, "time_s": self.time_s, **({"member_state": members} if members else {}),
        })

    def _resume(self) -> int:
        """Load the last checkpoint of the same settings; returns the round to continue from."""
        state = self.run.load_checkpoint(check=self._check_resumable)
        if state is None:
            return 0
        self.X.copy_(state["X"])
        for i, member in state.get("member_state", {}).items():
            self.member_state[int(i)] = member
        self.bytes_sent, self.time_s = int(state["bytes_sent"]), float(state["time_s"])
        return int(state["round"])

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if state["config"] != self._comparable_config():
            raise ConfigError(f"{self.run.path}: holds a run with a different config; choose another name= or set resume=false")
        if state["round"] > self.rounds:
            raise ConfigError(f"rounds: {self.run.path} already ran {state['round']} rounds; set rounds >= that or resume=false")
