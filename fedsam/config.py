"""`FedConfig`: every knob of a decentralized FL run, one dataclass for the CLI, the YAML files in
`experiments/configs/fed/` and the Flower run config. Everything that can be checked without
training is checked here, so a bad value fails before any data is loaded or any node trains;
`fedsam.client.federated_data` adds the checks that need the data (more nodes than samples)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from fedsam.algorithms import ALGORITHMS, Algorithm
from fedsam.mixing import check_q
from fedsam.topology import build_topology, is_random_topology
from shared import BASE_OPTIMIZERS, OPTIMIZERS, build_optimizer
from shared.config import ConfigError, check_finite
from shared.runio import check_run_name
from shared.validate import check_device, check_int, check_nonnegative, check_positive, check_range

#: The most nodes a run may have: the mixing matrix is a dense N x N array (float64: 800 MB at
#: 10,000 nodes) and its spectral gap an O(N^3) eigendecomposition (about a minute there).
MAX_NODES = 10_000


@dataclass
class FedConfig:
    """`samsuite fed run` settings; override any with key=value (e.g. algorithm=dfedavg topology=full).
    The defaults are the CPU demo: DFedSAM on digits, 10 nodes on a ring, Dirichlet alpha 0.3."""

    name: str | None = None  # run folder name under out_dir; None: derived from the settings
    out_dir: str = "runs"
    # inprocess: nodes one after the other; batched: all nodes' local steps in one vectorized pass
    # (fedsam.batched); auto: batched where the optimizer and model allow it, else inprocess; flower
    engine: Literal["inprocess", "batched", "auto", "flower"] = "inprocess"
    node_chunk: int | None = None  # batched engine: nodes per vectorized pass (None: sized from free memory)
    algorithm: str = "dfedsam"  # see fedsam.algorithms.ALGORITHMS
    rounds: int = 30
    # data and model
    dataset: str = "digits"  # testbeds.DATASETS: digits, mnist1d, cifar10, cifar100
    dataset_options: dict[str, Any] = field(default_factory=dict)  # e.g. {num_samples: 10000} for mnist1d
    data_dir: str | None = None
    num_nodes: int = 10
    partitioner: str = "dirichlet"
    alpha: float = 0.3  # Dirichlet concentration (smaller: more heterogeneous)
    classes_per_node: int = 2  # pathological partitioner
    local_test_fraction: float = 0.2  # of each node's data, kept for its personalized accuracy
    model: str = "cnn"
    # communication
    topology: str = "ring"
    topology_options: dict[str, Any] = field(default_factory=dict)  # e.g. {k: 4} for random-k, {path: A.csv} for file
    time_varying: bool = False  # redraw a random topology every round
    gossip_steps: int | None = None  # Q; None: the algorithm's default (4 for dfedsam-mgs, else 1)
    # local training (one round = K local steps from x_i)
    optimizer: str | None = None  # sam, asam, saf, tram-prev, ... or sgd, adamw, ...; None: the algorithm's default
    base_optimizer: str = "sgd"  # the base step of a SAM-family optimizer
    rho: float = 0.05  # the perturbation radius, for the members that take one
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. {alpha: 0.1} for gsam
    lr: float = 0.05
    lr_decay: float = 0.998  # lr in round r (from 0) is lr * lr_decay^r
    momentum: float | None = None  # None: the algorithm's default (0.9 for dfedavgm, else 0)
    weight_decay: float = 5e-4
    batch_size: int = 32
    local_epochs: int | None = None  # set one of local_epochs / local_steps; neither: 1 epoch
    local_steps: int | None = None
    # run
    fail_prob: float = 0.0  # in-process failure simulation: each node drops out of a round with this probability
    max_loss: float = 1e4  # a round's mean local training loss above this (or NaN) stops the run as diverged
    eval_every: int = 1  # rounds between evaluations (the last round is always evaluated)
    checkpoint_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    # torch CPU threads (None: torch's choice). Small models run fastest on one thread, and on a
    # busy 2-core machine two threads made the digits CNN 30x slower (measured); raise it for big CPU models.
    threads: int | None = 1
    resume: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        if self.name is not None:
            check_run_name(self.name)
        self._check_names()
        for key in ("rounds", "batch_size", "eval_every", "checkpoint_every", "classes_per_node"):
            _int(key, getattr(self, key), 1)
        _int("num_nodes", self.num_nodes, 2)
        self._check_size()
        for key in ("local_epochs", "local_steps", "threads", "node_chunk"):
            if getattr(self, key) is not None:
                _int(key, getattr(self, key), 1)
        if self.local_epochs is not None and self.local_steps is not None:
            raise ConfigError("local_epochs, local_steps: set one of them (the other stays null)")
        if self.gossip_steps is not None:
            _wrap(check_q, self.gossip_steps, prefix="gossip_steps")
        for key in ("rho", "lr", "alpha", "max_loss"):
            _wrap(check_positive, key, getattr(self, key))
        _wrap(check_range, "lr_decay", self.lr_decay, 1e-12, 1.0)
        _wrap(check_nonnegative, "weight_decay", self.weight_decay)
        if self.momentum is not None:
            _wrap(check_range, "momentum", self.momentum, 0.0, 1.0 - 1e-12)
        _wrap(check_range, "local_test_fraction", self.local_test_fraction, 0.0, 1.0 - 1e-12)
        _wrap(check_range, "fail_prob", self.fail_prob, 0.0, 1.0 - 1e-12)
        _wrap(check_device, "device", self.device)
        self._check_topology()
        self._check_optimizer()
        if self.engine == "batched" and self.unbatchable_reason() is not None:
            raise ConfigError(f"engine: batched cannot run optimizer={self.optimizer_name!r}: "
                              f"{self.unbatchable_reason()}; use engine=inprocess (or auto, which falls back)")
        if self.name is None:
            self.name = f"{self.dataset}-{self.algorithm}-{self.topology}-{self.partitioner}-n{self.num_nodes}-s{self.seed}"

    def _check_names(self) -> None:
        from fedsam.data import DATASETS, PARTITIONERS  # here, not at import: the data module pulls in `datasets`
        from fedsam.models import MODELS

        for key, registry in (("algorithm", ALGORITHMS), ("dataset", DATASETS), ("partitioner", PARTITIONERS),
                              ("model", MODELS), ("base_optimizer", BASE_OPTIMIZERS)):
            if getattr(self, key) not in registry:
                raise ConfigError(registry.unknown_message(getattr(self, key), key))
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS and self.optimizer not in BASE_OPTIMIZERS:
            allowed = ", ".join(OPTIMIZERS.names() + BASE_OPTIMIZERS.names())
            raise ConfigError(f"optimizer: unknown optimizer {self.optimizer!r}. Allowed: {allowed} (or null)")

    def _check_size(self) -> None:
        """num_nodes against MAX_NODES and the data set's size, before anything N x N is built."""
        from fedsam.data import DATASETS

        if self.num_nodes > MAX_NODES:
            raise ConfigError(f"num_nodes: at most {MAX_NODES:,} (the gossip matrix is a dense N x N array); "
                              f"got {self.num_nodes:,}")
        known = getattr(DATASETS.get(self.dataset), "num_train", None)
        if self.data_dir is not None or self.dataset_options:  # another copy or other options: checked once loaded
            known = None
        if known is not None and self.num_nodes > known:
            raise ConfigError(f"num_nodes: {self.dataset} has {known} training samples, so at most {known} nodes; "
                              f"got {self.num_nodes}")

    def _check_topology(self) -> None:
        """Build round 0's graph now: unknown names or options and disconnected graphs fail here."""
        if self.time_varying and not is_random_topology(self.topology):
            raise ConfigError(f"time_varying: only random topologies change per round, not {self.topology!r} (use random-k)")
        try:
            build_topology(self.topology, self.num_nodes, self.seed, **self.topology_options)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_optimizer(self) -> None:
        """Build the local optimizer once over a dummy parameter: bad options fail with its message."""
        try:
            self.local_optimizer([torch.zeros(1, requires_grad=True)], 0)
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(f"optimizer {self.optimizer_name!r} (optimizer_options, rho, lr, ...): {err}") from None

    # ---------------------------------------------------------------- resolved settings
    @property
    def spec(self) -> Algorithm:
        return ALGORITHMS.get(self.algorithm, field="algorithm")

    @property
    def q(self) -> int:
        """Gossip steps per round."""
        return self.spec.gossip_steps if self.gossip_steps is None else self.gossip_steps

    @property
    def optimizer_name(self) -> str:
        return self.spec.optimizer if self.optimizer is None else self.optimizer.lower()

    @property
    def local_momentum(self) -> float:
        return self.spec.momentum if self.momentum is None else self.momentum

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def round_lr(self, round_idx: int) -> float:
        return self.lr * self.lr_decay**round_idx

    def local_step_count(self, num_train: int) -> int:
        """K for a node with `num_train` examples: the algorithm's fixed K, local_steps, or
        local_epochs (default 1) passes over the node's data in batches of batch_size."""
        if self.spec.local_steps is not None:
            return self.spec.local_steps
        if self.local_steps is not None:
            return self.local_steps
        return (self.local_epochs or 1) * -(-num_train // self.batch_size)

    def unbatchable_reason(self) -> str | None:
        """Why the local optimizer cannot train stacked nodes (`Member.batchable`), or None if it can;
        plain base optimizers are element-wise and always can."""
        name = self.optimizer_name
        if name in OPTIMIZERS and not OPTIMIZERS.get(name).batchable:
            return "its state or hooks see one model at a time (Member.batchable is False)"
        return None

    def local_optimizer(self, params: Iterable[Tensor], round_idx: int, *, replicas: int | None = None) -> Optimizer:
        """A fresh local optimizer for round `round_idx` (state such as momentum restarts every
        round from x_i, as in the algorithms' local loops; a member's own state, such as SAF's
        buffer, is the node's and `local_update` loads it). `rho` goes only to members whose
        constructor takes one. `replicas=R`: the parameters stack R nodes' models along dim 0
        (the batched engine); a member then takes its norms per node."""
        name = self.optimizer_name
        base = self.base_optimizer if name in OPTIMIZERS else name
        kwargs: dict[str, Any] = {"lr": self.round_lr(round_idx), "weight_decay": self.weight_decay}
        if "momentum" in inspect.signature(BASE_OPTIMIZERS.get(base)).parameters:
            kwargs["momentum"] = self.local_momentum
        elif self.local_momentum:
            raise ConfigError(f"momentum: the base optimizer {base!r} takes no momentum; set momentum=0")
        if name in OPTIMIZERS:
            if "rho" in inspect.signature(OPTIMIZERS.get(name)).parameters:  # members without a radius refuse one
                kwargs["rho"] = self.rho
            if replicas is not None:
                kwargs["replicas"] = replicas
            return build_optimizer(name, params, base, **self.optimizer_options, **kwargs)
        return build_optimizer(name, params, **self.optimizer_options, **kwargs)

    def resolved(self) -> dict[str, Any]:
        """The settings that defaults resolve to, recorded in the summary."""
        return {"optimizer": self.optimizer_name, "momentum": self.local_momentum, "gossip_steps": self.q,
                "local_steps_fixed": self.spec.local_steps, "device": str(self.torch_device)}


def _wrap(check: Any, *args: Any, prefix: str | None = None) -> None:
    """Run a shared.validate check, turning its ValueError into a ConfigError."""
    try:
        check(*args)
    except ValueError as err:
        message = str(err)
        if prefix is not None:
            message = f"{prefix}: {message.partition(': ')[2] or message}"
        raise ConfigError(message) from None


def _int(key: str, value: Any, low: int) -> None:
    check_int(key, value, low, ConfigError)
