"""Gossip topologies and their mixing matrices for decentralized FL.

DFedSAM (Shi et al., ICML 2023, "Improving the Model Consistency of Decentralized Federated
Learning") mixes node models as x_i <- sum_l W_il y_l (W^Q for Q gossip steps). Its analysis
needs W symmetric and doubly stochastic; the spectral gap 1 - max(|lambda_2|, |lambda_N|) sets how
fast gossip reaches consensus, so it is reported with every run.

A topology is a symmetric boolean adjacency matrix without self loops, built by a member of
`TOPOLOGIES` from `(n, rng, **opts)`; `build_topology` adds the checks every caller needs
(n >= 2, known name and options, connected). Metropolis-Hastings weights turn any such graph into
a valid W, also on the surviving subgraph when nodes fail (`live_mixing`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared.registry import Registry
from shared.seeding import derive_seed

TopologyBuilder = Callable[..., np.ndarray]
TOPOLOGIES: Registry[TopologyBuilder] = Registry("topology")

MAX_TRIES = 100  # random-k redraws before giving up on a connected graph


def _edges(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Symmetric adjacency with edges i-j; self loops (i == j, e.g. wrap-around on tiny graphs) dropped."""
    adj = np.zeros((n, n), dtype=bool)
    adj[i, j] = True
    adj[j, i] = True
    np.fill_diagonal(adj, False)
    return adj


@TOPOLOGIES.register("ring")
def ring(n: int, rng: np.random.Generator) -> np.ndarray:
    """Node i talks to i-1 and i+1 (mod n): degree 2 (1 for n = 2); the slowest-mixing common graph."""
    i = np.arange(n)
    return _edges(n, i, (i + 1) % n)


def grid_shape(n: int) -> tuple[int, int]:
    """The most square factorization rows x cols = n (rows <= cols), as a 2-D torus uses it."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


@TOPOLOGIES.register("grid")
def grid(n: int, rng: np.random.Generator) -> np.ndarray:
    """2-D torus on the most square rows x cols = n: degree 4 (less when a side is 2)."""
    rows, cols = grid_shape(n)
    if rows == 1:
        raise ValueError(
            f"topology: 'grid' needs n = rows x cols with rows, cols >= 2, but n={n} is prime; "
            "use n with a factorization (e.g. 9, 16, 100) or another topology (ring, exponential, random-k)"
        )
    r, c = np.divmod(np.arange(n), cols)
    right = r * cols + (c + 1) % cols
    down = ((r + 1) % rows) * cols + c
    i = np.arange(n)
    return _edges(n, np.concatenate([i, i]), np.concatenate([right, down]))


@TOPOLOGIES.register("exponential")
def exponential(n: int, rng: np.random.Generator) -> np.ndarray:
    """Node i linked to i +- 2^k (mod n), k = 0..floor(log2(n-1)), made symmetric (Ying et al. 2021):
    O(log n) degree with a spectral gap that does not vanish as n grows."""
    offsets = 2 ** np.arange(math.floor(math.log2(n - 1)) + 1)
    i = np.repeat(np.arange(n), len(offsets))
    return _edges(n, i, (i + np.tile(offsets, n)) % n)


@TOPOLOGIES.register("full")
def full(n: int, rng: np.random.Generator) -> np.ndarray:
    """Everyone talks to everyone: W = J/n, one gossip step is exact averaging (spectral gap 1)."""
    return ~np.eye(n, dtype=bool)


@TOPOLOGIES.register("star")
def star(n: int, rng: np.random.Generator) -> np.ndarray:
    """Node 0 is the hub (degree n-1), the others leaves (degree 1): the server topology, as a graph."""
    adj = np.zeros((n, n), dtype=bool)
    adj[0, 1:] = adj[1:, 0] = True
    return adj


def _random_regular(n: int, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """One draw of a random simple graph with every degree k (one node k+1 when n*k is odd), by
    pairing stubs at random and re-pairing the clashes (after Steger & Wormald 1999); None when
    the remaining stubs cannot be paired (the caller draws again)."""
    stubs = np.repeat(np.arange(n), k)
    if len(stubs) % 2:
        stubs = np.append(stubs, rng.integers(n))
    adj = np.zeros((n, n), dtype=bool)
    while len(stubs):
        stubs = rng.permutation(stubs)
        a, b = stubs[0::2], stubs[1::2]
        left: list[int] = []
        for u, v in zip(a.tolist(), b.tolist()):
            if u != v and not adj[u, v]:
                adj[u, v] = adj[v, u] = True
            else:
                left += [u, v]
        if left:
            nodes = np.unique(left)
            free = ~adj[np.ix_(nodes, nodes)]
            np.fill_diagonal(free, False)
            if not free.any():
                return None
        stubs = np.asarray(left, dtype=np.int64)
    return adj


@TOPOLOGIES.register("random-k")
def random_k(n: int, rng: np.random.Generator, *, k: int | None = None) -> np.ndarray:
    """Random k-regular graph (k neighbours each; one node k+1 if n*k is odd; k defaults to
    min(4, n-1)), seeded by rng and redrawn until connected, up to MAX_TRIES draws."""
    k = min(4, n - 1) if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise ValueError(
            f"topology.k: expected an integer in [1, n-1] = [1, {n - 1}] for 'random-k' with n={n}, got {k!r}"
        )
    for _ in range(MAX_TRIES):
        adj = _random_regular(n, int(k), rng)
        if adj is not None and len(connected_components(adj)) == 1:
            return adj
    raise ValueError(
        f"topology: 'random-k' with n={n}, k={k} drew no connected graph in {MAX_TRIES} tries; "
        "use a larger k (>= 3 is almost always connected)"
    )


random_k.randomized = True  # type: ignore[attr-defined]  # redrawn per round when time-varying


@TOPOLOGIES.register("file")
def from_file(n: int, rng: np.random.Generator, *, path: str | Path | None = None) -> np.ndarray:
    """A user-given 0/1 adjacency matrix (.npy, or .csv/.txt with comma or whitespace separators).
    It must be square, symmetric and n x n; its diagonal is ignored (W_ii comes from the weights)."""
    if path is None:
        raise ValueError("topology.path: the 'file' topology needs path=<adjacency matrix .npy/.csv/.txt>")
    path = Path(path)
    where = f"topology.path: {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        if path.suffix == ".npy":
            mat = np.load(path, allow_pickle=False)
        else:
            text = path.read_text()
            mat = np.loadtxt(path, delimiter="," if "," in text else None, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{where}: cannot read a numeric matrix ({err})") from None
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"{where}: expected a square matrix, got shape {mat.shape}")
    if not np.isin(mat, (0, 1)).all():
        bad = tuple(int(x) for x in np.argwhere(~np.isin(mat, (0, 1)))[0])
        raise ValueError(f"{where}: expected only 0/1 entries, got {mat[bad].item()!r} at {bad}")
    if mat.shape[0] != n:
        raise ValueError(f"{where}: the matrix has {mat.shape[0]} nodes but n={n}; they must be equal")
    adj = mat.astype(bool)
    np.fill_diagonal(adj, False)
    if not (adj == adj.T).all():
        i, j = (int(x) for x in np.argwhere(adj != adj.T)[0])
        raise ValueError(
            f"{where}: expected a symmetric matrix, but A[{i},{j}]={int(adj[i, j])} != A[{j},{i}]={int(adj[j, i])}"
        )
    return adj


def connected_components(adj: np.ndarray) -> list[list[int]]:
    """Connected components (sorted node lists, largest first) of a symmetric adjacency."""
    adj = np.asarray(adj, dtype=bool)
    seen = np.zeros(len(adj), dtype=bool)
    comps: list[list[int]] = []
    for start in range(len(adj)):
        if seen[start]:
            continue
        comp = np.zeros(len(adj), dtype=bool)
        comp[start] = True
        frontier = comp.copy()
        while frontier.any():
            frontier = adj[frontier].any(axis=0) & ~comp
            comp |= frontier
        seen |= comp
        comps.append(np.flatnonzero(comp).tolist())
    return sorted(comps, key=lambda c: (-len(c), c[0]))


def _describe(comps: list[list[int]], limit: int = 4) -> str:
    parts = [str(c) if len(c) <= 8 else f"[{c[0]}, {c[1]}, ... {len(c)} nodes]" for c in comps[:limit]]
    more = f", ... {len(comps) - limit} more" if len(comps) > limit else ""
    return f"{len(comps)} components: {', '.join(parts)}{more}"


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n (number of nodes): expected an integer >= 2, got {n!r}")
    return int(n)


def build_topology(name: str, n: int, seed: int = 0, **opts: Any) -> np.ndarray:
    """Adjacency (n, n) bool of topology `name`, checked: n >= 2, known name and options, symmetric,
    no self loops, connected. Random topologies draw from a stream derived from (seed, "topology")."""
    n = _check_n(n)
    builder = TOPOLOGIES.get(name, field="topology")
    allowed = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for key in opts:
        if key not in allowed:
            raise ValueError(f"topology.{key}: unknown option for '{name}'. Allowed: {', '.join(allowed) or '(none)'}")
    adj = np.asarray(builder(n, np.random.default_rng(derive_seed(seed, "topology")), **opts), dtype=bool)
    if adj.shape != (n, n) or (adj != adj.T).any() or adj.diagonal().any():
        raise ValueError(
            f"topology: '{name}' built an invalid adjacency (expected symmetric ({n}, {n}) without self loops)"
        )
    comps = connected_components(adj)
    if len(comps) > 1:
        raise ValueError(
            f"topology: '{name}' with n={n} is disconnected ({_describe(comps)}); gossip cannot reach consensus"
        )
    return adj


def is_random_topology(name: str) -> bool:
    """Whether `name` draws its graph at random (so a time-varying run redraws it every round); a
    registered builder opts in with the attribute `randomized = True`."""
    return bool(getattr(TOPOLOGIES.get(name, field="topology"), "randomized", False))


def topology_for_round(
    name: str, n: int, seed: int, rnd: int, *, time_varying: bool = False, **opts: Any
) -> np.ndarray:
    """The adjacency used in round `rnd`: with `time_varying`, a random topology is redrawn from
    derive_seed(seed, "round", rnd) (independent of the other rounds, reproducible); otherwise,
    and for deterministic topologies, the same graph every round."""
    return build_topology(name, n, derive_seed(seed, "round", rnd) if time_varying else seed, **opts)


def _check_adjacency(adj: Any) -> np.ndarray:
    adj = np.asarray(adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adj: expected a square matrix, got shape {adj.shape}")
    adj = adj.astype(bool)
    if adj.diagonal().any() or (adj != adj.T).any():
        raise ValueError("adj: expected a symmetric adjacency without self loops")
    return adj


def metropolis_hastings(adj: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij:
    symmetric and doubly stochastic for any undirected graph, using only neighbours' degrees (so a
    P2P node can compute its row locally). Float64 (n, n)."""
    adj = _check_adjacency(adj)
    deg = adj.sum(axis=1)
    W = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def check_mixing_matrix(W: np.ndarray, atol: float = 1e-8, name: str = "W") -> None:
    """Raise ValueError unless W is square, finite, non-negative, symmetric and doubly stochastic
    (all within `atol`); the message lists every violation with the worst entry."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name}: expected a square mixing matrix, got shape {W.shape}")
    if not np.isfinite(W).all():
        i, j = (int(x) for x in np.argwhere(~np.isfinite(W))[0])
        raise ValueError(f"{name}: expected finite entries, got {W[i, j]} at [{i},{j}]")
    problems = []
    if W.min() < -atol:
        i, j = np.unravel_index(np.argmin(W), W.shape)
        problems.append(f"negative entry {name}[{i},{j}]={W[i, j]:.3g}")
    asym = np.abs(W - W.T)
    if asym.max() > atol:
        i, j = np.unravel_index(np.argmax(asym), W.shape)
        problems.append(f"not symmetric: {name}[{i},{j}]={W[i, j]:.6g} != {name}[{j},{i}]={W[j, i]:.6g}")
    for axis, what in ((1, "row"), (0, "column")):
        dev = W.sum(axis=axis) - 1.0
        worst = int(np.argmax(np.abs(dev)))
        if abs(dev[worst]) > atol:
            sums = f"{what} {worst} sums to {1.0 + dev[worst]:.6g} (off by {dev[worst]:+.3g})"
            problems.append(f"not doubly stochastic: {sums}")
    if problems:
        raise ValueError(f"{name}: invalid mixing matrix: " + "; ".join(problems))


def spectral_gap(W: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric W (eigenvalues in decreasing order): 1 for
    exact averaging, 0 when gossip never mixes (disconnected graph or a bipartite oscillation)."""
    lam = np.linalg.eigvalsh(np.asarray(W, dtype=np.float64))  # ascending: lam[-1] = 1
    return float(1.0 - max(abs(lam[-2]), abs(lam[0])))


def live_mixing(adj: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """W for a round in which only `alive` nodes answered: Metropolis-Hastings on the live subgraph,
    so W stays symmetric and doubly stochastic; a failed node keeps its model (row e_i) and nobody
    mixes it in. Returns W and the components of the live subgraph (more than one: gossip is split
    this round; allowed, but the caller should report it)."""
    adj = _check_adjacency(adj)
    alive = np.asarray(alive, dtype=bool)
    if alive.shape != (len(adj),):
        raise ValueError(f"alive: expected a boolean mask of shape ({len(adj)},), got shape {alive.shape}")
    live = np.flatnonzero(alive)
    W = np.eye(len(adj))
    sub = adj[np.ix_(live, live)]
    W[np.ix_(live, live)] = metropolis_hastings(sub)
    comps = [[int(live[i]) for i in c] for c in connected_components(sub)] if len(live) else []
    return W, comps
