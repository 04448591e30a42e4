"""The batched engine: every node's K local steps in one vectorized pass (`engine: batched`).

The nodes' models already live stacked in `FedRun`'s X (N, P). Here a chunk of R nodes becomes one
`StackedModel`: each parameter holds the R models stacked along its first dimension, and one
`torch.func.vmap` of `functional_call` applies each node's model to its own mini-batch (vmap turns
the convolutions into grouped convolutions, the matmuls into batched ones). The loss is the sum of
the nodes' mean losses, so the gradient of row j is node j's own gradient; the local optimizer is
the same `shared` member the sequential engine uses, built with `replicas=R` so that its norms and
inner products are per node (`shared.sam.base.global_norm`). No second, functional copy of any
member exists.

Exactness: each node draws its batches from `fedsam.client.node_batches` (its own generator, as
the sequential engine), a shorter last batch is padded with targets the loss ignores, and a node
with fewer steps than the chunk's longest is masked: its rows of the weights and of the optimizer
state are put back after each step it does not take. That restore is exact for optimizers whose
state is element-wise (SGD's momentum); an optimizer with a per-tensor counter shared by the rows
(Adam's `step`) gets chunks of nodes with equal step counts instead. Metrics then equal the
sequential engine's to float tolerance: vmap's grouped kernels sum in another order than one
node's kernels, so results differ by rounding (about 1e-6 relative per step in float32) and no more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedsam.client import EVAL_BATCH, federated_data, mean_loss, node_batches, node_model
from fedsam.config import FedConfig
from fedsam.mixing import FlatSpec
from shared import Batch, member_backward
from shared.config import ConfigError
from shared.sam.base import SharpnessAware

if TYPE_CHECKING:
    from fedsam.partitions import FederatedData

IGNORE = -100  # the target of a padded example (F.cross_entropy's ignore_index)
MEMORY_FRACTION = 0.5  # of the free memory that an automatic node_chunk may fill
#: A step's fixed cost in full-batch node-steps (`chunk_plan`'s `overhead`). CPU: measured on the
#: MNIST-1D CNN, one thread (a batched SAM step of R nodes: about 0.5 ms + 1.5 ms x R, at R = 10 and
#: 100). CUDA: a guess, not measured here (no GPU was lent): a small model's step is launch-bound,
#: so masking a few nodes for a step costs less than another pass.
STEP_OVERHEAD = {"cpu": 1.0, "cuda": 32.0}


def unbatchable_model(model: nn.Module) -> str | None:
    """Why `model` cannot be vmapped over stacked nodes exactly, or None: buffers (batch norm's
    running statistics would see the padding and are not stacked) or active dropout (vmap would
    draw other random numbers than one node alone)."""
    if any(True for _ in model.buffers()):
        return "it has buffers (e.g. batch norm's running statistics); use a GroupNorm model such as cnn"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return "it has dropout, whose random draws under vmap differ from one node's"
    return None


def batch_blocker(cfg: FedConfig, data: FederatedData | None = None) -> str | None:
    """Why `cfg` cannot run on the batched engine (its optimizer or its model), or None."""
    reason = cfg.unbatchable_reason()
    if reason is not None:
        return f"optimizer={cfg.optimizer_name!r}: {reason}"
    reason = unbatchable_model(node_model(cfg, federated_data(cfg) if data is None else data))
    return None if reason is None else f"model={cfg.model!r}: {reason}"


class StackedModel(nn.Module):
    """R copies of `template`'s architecture with their own weights, stacked: parameter k has shape
    (R, *shape_k). forward((R, B, ...) inputs) -> (R, B, classes) logits, node j's batch through
    node j's weights. The template's own weights are never used (it is held outside the module)."""

    def __init__(self, template: nn.Module, weights: Sequence[Tensor]) -> None:
        super().__init__()
        self._template = (template,)  # a tuple: not a submodule, so its parameters are not ours
        self.names = [name for name, _ in template.named_parameters()]
        self.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
        self._forward = vmap(self._one)

    def train(self, mode: bool = True) -> StackedModel:
        """Also the template's mode: functional_call runs its modules."""
        super().train(mode)
        self._template[0].train(mode)
        return self

    def _one(self, weights: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(self._template[0], dict(zip(self.names, weights)), (x,))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(tuple(self.weights), x)


class NodeLoss:
    """The criterion of a stacked step: the sum over nodes of each node's mean cross-entropy over its
    real (not padded) examples. The first call after `reset` (the pass at w) keeps the per-node
    means, which become the nodes' train_loss as the sequential engine reports it."""

    def __init__(self, counts: Tensor) -> None:
        self.counts = counts  # (R,) real examples per node in this step (>= 1: masked nodes count 1)
        self.at_w: Tensor | None = None

    def reset(self) -> None:
        self.at_w = None

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_example = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
        per_node = per_example.view(targets.shape).sum(1) / self.counts
        if self.at_w is None:
            self.at_w = per_node.detach()
        return per_node.sum()


def batch_sizes(n: int, batch_size: int, steps: int) -> list[int]:
    """The sizes of the `steps` batches that `fedsam.client.batch_indices` cuts from n examples:
    passes of ceil(n / B) batches, the last of each pass holding the rest."""
    epoch = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return (epoch * -(-steps // len(epoch)))[:steps]


def chunk_plan(sizes: Mapping[int, Sequence[int]], node_chunk: int, *, mask: bool, overhead: float = 1.0,
               window: int = 64) -> list[list[int]]:
    """The nodes' passes, at most `node_chunk` nodes each, from each node's batch sizes (one per
    step). Nodes sorted by step count, then data size (largest first) form runs of equal sizes;
    with `mask`, consecutive runs (up to `window` of them) are merged where one masked, padded pass
    costs less than separate ones. A step of R nodes padded to its largest batch b costs
    `overhead` + R b / b_max: `overhead` is a step's fixed cost in full-batch node-steps (small on
    a CPU, where a pass's cost grows with its work; large on a GPU, where a small model's step is
    launch-bound). Without `mask` (state that cannot be restored row by row), only nodes with
    equal step counts share a pass."""
    order = sorted(sizes, key=lambda i: (-len(sizes[i]), -sum(sizes[i]), i))
    runs: list[list[int]] = []
    for node in order:
        last = runs[-1][0] if runs else None
        same = last is not None and (list(sizes[last]) == list(sizes[node]) if mask else len(sizes[last]) == len(sizes[node]))
        if same and len(runs[-1]) < node_chunk:
            runs[-1].append(node)
        else:
            runs.append([node])
    if not mask:
        return runs
    full = max(max(s) for s in sizes.values())
    # best[i]: the least cost of the first i runs; a pass merges runs j..i-1, run j leads (most steps)
    best, cut = [0.0] + [float("inf")] * len(runs), [0] * (len(runs) + 1)
    for i in range(1, len(runs) + 1):
        count, widest = 0, [0] * len(sizes[runs[i - 1][0]])
        for j in range(i - 1, max(i - 1 - window, -1), -1):
            count += len(runs[j])
            if count > node_chunk:
                break
            lead = sizes[runs[j][0]]
            widest = [max(a, b) for a, b in zip(lead, widest)] + list(lead[len(widest):])
            cost = best[j] + sum(overhead + count * b / full for b in widest)
            if cost < best[i]:
                best[i], cut[i] = cost, j
    passes, i = [], len(runs)
    while i:
        passes.append([node for run in runs[cut[i] : i] for node in run])
        i = cut[i]
    return passes[::-1]


def auto_node_chunk(cfg: FedConfig, model: nn.Module, input_shape: Sequence[int], nodes: int) -> int:
    """Nodes per pass when `node_chunk` is unset: what fits in MEMORY_FRACTION of the device's free
    memory (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable), at the cost of one node's step
    estimated from its weights (weights, gradients, the optimizer's and SAM's buffers: 5 copies)
    and its activations (measured on one example by forward hooks, kept once and differentiated
    once: 2x, per example of the batch)."""
    device = cfg.torch_device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _host_available()
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_node = 5 * weights + 2 * cfg.batch_size * sum(sizes)
    return max(1, min(nodes, int(MEMORY_FRACTION * free // max(per_node, 1))))


def _host_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (a fixed 4 GiB where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class _Slots:
    """Stacked inputs and targets for R nodes, from one buffer each allocated once: a step uses the
    first R x b entries, b the longest of the step's batches, so nodes with less data are padded
    to b, not to the buffer's capacity; padded targets are IGNORE."""

    def __init__(self, R: int, capacity: int, input_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.R, self.input_shape = R, input_shape
        self.x = torch.zeros(R * capacity * math.prod(input_shape), dtype=dtype, device=device)
        self.y = torch.empty(R * capacity, dtype=torch.long, device=device)

    def fill(self, parts: Mapping[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(x (R, b, ...), y (R, b)) holding node j's batch `parts[j]` in row j; rows without a
        part hold only IGNORE targets (and stale, finite inputs)."""
        b = max(len(yb) for _, yb in parts.values())
        x = self.x[: self.R * b * math.prod(self.input_shape)].view(self.R, b, *self.input_shape)
        y = self.y[: self.R * b].view(self.R, b).fill_(IGNORE)
        for j, (xb, yb) in parts.items():
            x[j, : len(yb)].copy_(xb, non_blocking=True)
            y[j, : len(yb)].copy_(yb, non_blocking=True)
        return x, y


class BatchedTrainer:
    """Trains a round's nodes in vectorized passes; `round(r, tasks)` returns the updates that
    `FedRun.finish_round` takes, as the sequential engine's `local_update` would."""

    def __init__(self, cfg: FedConfig, data: FederatedData, spec: FlatSpec) -> None:
        self.cfg, self.data, self.spec = cfg, data, spec
        self.template = node_model(cfg, data)
        reason = batch_blocker(cfg, data)
        if reason is not None:
            raise ConfigError(f"engine: batched cannot run this config: {reason}; use engine=inprocess")
        names = [name for name, _ in self.template.named_parameters()]
        if list(spec.names or ()) != names:
            raise ConfigError(f"engine: batched needs a model whose state is its parameters, got {spec.names}")
        self.device = cfg.torch_device
        self.input_shape = tuple(data.input_shape)
        self.node_chunk = cfg.node_chunk or auto_node_chunk(cfg, self.template, self.input_shape, cfg.num_nodes)
        probe = cfg.local_optimizer([torch.zeros(1, requires_grad=True)], 0)
        base = probe.base_optimizer if isinstance(probe, SharpnessAware) else probe
        self.mask_exact = type(base) is torch.optim.SGD  # its only state, the momentum, is element-wise
        self._plan: tuple[tuple[int, ...], list[list[int]]] | None = None  # (live nodes, their passes)

    def batch_sizes(self, node: int) -> list[int]:
        """Node `node`'s batch sizes in a round, one per local step."""
        n = len(self.data.nodes[node].train_y)
        return batch_sizes(n, self.cfg.batch_size, self.cfg.local_step_count(n))

    def round(self, r: int, tasks: Sequence[tuple[int, Mapping[str, Tensor]]]) -> dict[int, tuple[dict, dict]]:
        states = dict(tasks)
        updates: dict[int, tuple[dict, dict]] = {}
        for nodes in self._passes(tuple(states)):
            updates.update(self._train(r, nodes, [states[i] for i in nodes],
                                       [len(self.batch_sizes(i)) for i in nodes]))
        return {node: updates[node] for node in states}

    def _passes(self, live: tuple[int, ...]) -> list[list[int]]:
        """The round's passes for the live nodes; the plan is kept while they stay the same (every round
        of a run without failures), since the nodes' batch sizes never change."""
        if self._plan is None or self._plan[0] != live:
            sizes = {node: self.batch_sizes(node) for node in live}
            overhead = STEP_OVERHEAD.get(self.device.type, 1.0)
            self._plan = (live, chunk_plan(sizes, self.node_chunk, mask=self.mask_exact, overhead=overhead))
        return self._plan[1]

    def _train(self, r: int, nodes: list[int], states: list[Mapping[str, Tensor]], steps: list[int]
               ) -> dict[int, tuple[dict, dict]]:
        """K_j local steps for each node j of one pass, from its state; returns its updates."""
        t0 = time.perf_counter()
        R, B, device = len(nodes), self.cfg.batch_size, self.device
        stacked = StackedModel(self.template, [torch.stack([s[name] for s in states]).to(device)
                                               for name in self.spec.names])  # type: ignore[union-attr]
        stacked.train()
        opt = self.cfg.local_optimizer(stacked.parameters(), r, replicas=R)
        slots = _Slots(R, B, self.input_shape, self.data.nodes[0].train_x.dtype, device)
        counts = torch.ones(R, dtype=stacked.weights[0].dtype, device=device)
        criterion = NodeLoss(counts)
        batches: list[Iterator[tuple[Tensor, Tensor, Tensor]]] = [
            node_batches(self.cfg, self.data, node, r) for node in nodes]
        at_w: list[Tensor] = []  # per step, every node's loss at w (R,)
        sizes: list[list[int]] = [[] for _ in nodes]
        for k in range(max(steps)):
            drawn = {j: next(batches[j])[:2] for j in range(R) if steps[j] > k}
            x, y = slots.fill(drawn)
            for j, (_, yb) in drawn.items():
                counts[j] = len(yb)
                sizes[j].append(len(yb))
            idle = [j for j in range(R) if steps[j] <= k]
            kept = self._rows(opt, stacked, idle) if idle else None
            criterion.reset()
            member_backward(opt, stacked, [Batch(x, y)], criterion)
            opt.step()
            if kept is not None:
                for t, rows in kept:
                    t[idle] = rows
            at_w.append(criterion.at_w)  # type: ignore[arg-type]
        losses = torch.stack(at_w).cpu()
        elapsed = time.perf_counter() - t0
        out = {}
        for j, node in enumerate(nodes):
            state = {name: w[j].detach() for name, w in zip(self.spec.names, stacked.weights)}  # type: ignore[arg-type]
            out[node] = (state, {"train_loss": mean_loss(losses[: steps[j], j], sizes[j]),
                                 "num_examples": len(self.data.nodes[node].train_y), "num_steps": steps[j],
                                 "compute_s": elapsed / R})
        return out

    @torch.no_grad()
    def evaluate_nodes(self, X: Tensor) -> list[float]:
        """The accuracy of each node's model (row i of X) on its local test split, for the nodes
        that have one, in node order: `FedRun`'s personal evaluation, in vectorized passes."""
        nodes = [i for i, node in enumerate(self.data.nodes) if len(node.test_y)]
        accuracy: list[float] = []
        for start in range(0, len(nodes), self.node_chunk):
            chunk = nodes[start : start + self.node_chunk]
            rows = X[chunk].split(self.spec.sizes, dim=1)
            model = StackedModel(self.template, [w.reshape(len(chunk), *shape) for w, shape in zip(rows, self.spec.shapes)])
            model.eval()
            tests = [(self.data.nodes[i].test_x, self.data.nodes[i].test_y) for i in chunk]
            block = max(1, EVAL_BATCH // len(chunk))
            slots = _Slots(len(chunk), block, self.input_shape, tests[0][0].dtype, self.device)
            correct = torch.zeros(len(chunk), dtype=torch.int64, device=self.device)
            for lo in range(0, max(len(ty) for _, ty in tests), block):
                x, y = slots.fill({j: (tx[lo : lo + block], ty[lo : lo + block])
                                   for j, (tx, ty) in enumerate(tests) if lo < len(ty)})
                correct += (model(x).argmax(-1) == y).sum(1)  # padding's target IGNORE is never a class
            accuracy += [int(c) / len(ty) for c, (_, ty) in zip(correct.tolist(), tests)]
        self.template.train()
        return accuracy

    @staticmethod
    def _rows(opt: torch.optim.Optimizer, model: nn.Module, idle: list[int]) -> list[tuple[Tensor, Tensor]]:
        """(tensor, copy of its `idle` rows) for the weights and every per-row optimizer state
        tensor, to put back after a step those nodes do not take."""
        states = [opt.state, *([opt.base_optimizer.state] if isinstance(opt, SharpnessAware) else [])]
        tensors = [p.data for p in model.parameters()]
        R = len(tensors[0])
        tensors += [t for state in states for entry in state.values() for t in entry.values()
                    if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == R]
        return [(t, t[idle].clone()) for t in tensors]

