"""Combination weights. Pure: no torch, no processes.

Weight-matrix convention, used everywhere in this project: ``A[l, k]`` is the weight agent ``k`` gives to
agent ``l``'s state, so agent k combines ``w_k = sum_l A[l, k] * phi_l`` (i.e. ``W = A.T @ Phi`` for
stacked states). Columns sum to one; the rules here are symmetric, so rows do too (doubly stochastic).

Cost: the weight matrix is dense (K x K float64), so memory grows as K^2; ``build_topology`` refuses up front
(``check_size``) a K whose matrix cannot fit. The checks are O(K^2) at most; the exact spectrum behind
``mixing_rate`` is O(K^3) and is skipped (``None``) above ``EXACT_SPECTRUM_MAX_AGENTS`` agents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

_TOL = 1e-12
#: Above this many agents ``mixing_rate`` returns ``None`` instead of an O(K^3) eigendecomposition that would
#: hold the start of a run for minutes (timings in docs/notes.md).
EXACT_SPECTRUM_MAX_AGENTS = 2048
#: The same cap for a non-symmetric matrix (user weight files, directed schedules): the general eigensolver
#: ``eigvals`` is several times slower than the symmetric ``eigvalsh``.
EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC = 1024


def metropolis_weights(graph: nx.Graph) -> np.ndarray:
    """Metropolis rule: ``a_lk = 1/max(n_k, n_l)`` for neighbours, ``n`` = neighbourhood size incl. self."""
    k = graph.number_of_nodes()
    n = np.array([graph.degree(v) + 1 for v in range(k)], dtype=np.float64)
    a = np.zeros((k, k))
    for u, v in graph.edges:
        a[u, v] = a[v, u] = 1.0 / max(n[u], n[v])
    a[np.diag_indices(k)] = 1.0 - a.sum(axis=0)
    return a


def max_degree_weights(graph: nx.Graph) -> np.ndarray:
    """Maximum-degree rule: ``a_lk = 1/(d_max + 1)`` for neighbours, the rest on the diagonal."""
    k = graph.number_of_nodes()
    d_max = max((d for _, d in graph.degree), default=0)
    a = np.zeros((k, k))
    for u, v in graph.edges:
        a[u, v] = a[v, u] = 1.0 / (d_max + 1)
    a[np.diag_indices(k)] = 1.0 - a.sum(axis=0)
    return a


WEIGHT_RULES = {"metropolis": metropolis_weights, "max_degree": max_degree_weights}


def mixing_rate(a: np.ndarray) -> float | None:
    """lambda_2 = spectral radius of ``A.T - 11^T/K``: how fast repeated combination reaches consensus.

    Exact (an O(K^3) eigendecomposition: ``eigvalsh`` when ``A`` is exactly symmetric, as the Metropolis and
    maximum-degree rules are, else ``eigvals``), or ``None`` = not computed, when ``A`` has more than
    ``EXACT_SPECTRUM_MAX_AGENTS`` agents (``EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC`` if not symmetric). Whether
    lambda_2 < 1 (the agents agree) does not need it: ``support_is_primitive`` decides that exactly in O(K^2)."""
    k = a.shape[0]
    if k > EXACT_SPECTRUM_MAX_AGENTS:
        return None
    symmetric = np.array_equal(a, a.T)
    if not symmetric and k > EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC:
        return None
    shifted = a.T - 1.0 / k
    eig = np.linalg.eigvalsh(shifted) if symmetric else np.linalg.eigvals(shifted)
    return float(np.max(np.abs(eig)))


def _reach(support: np.ndarray) -> np.ndarray:
    """BFS levels from agent 0 along the edges ``l -> k`` of ``support[l, k]``; -1: unreached.

    Each row is scanned once, when its node leaves the frontier: O(K^2) in numpy, O(K) extra memory."""
    k = support.shape[0]
    level = np.full(k, -1, dtype=np.int64)
    level[0] = 0
    frontier = np.array([0])
    depth = 0
    while frontier.size:
        depth += 1
        frontier = np.flatnonzero(support[frontier].any(axis=0) & (level < 0))
        level[frontier] = depth
    return level


def _transposed(m: np.ndarray, block: int = 256) -> np.ndarray:
    """A C-contiguous copy of ``m.T``, copied in square tiles (a plain strided copy is ~7x slower at K = 8000)."""
    k = m.shape[0]
    if k <= 4 * block:
        return np.ascontiguousarray(m.T)
    out = np.empty_like(m)
    for i in range(0, k, block):
        for j in range(0, k, block):
            out[j:j + block, i:i + block] = m[i:i + block, j:j + block].T
    return out


def support_is_primitive(support: np.ndarray) -> bool:
    """Whether a nonnegative matrix with this boolean support (``support[l, k]``: edge ``l -> k``, self-loops
    included) is primitive (some power entrywise positive), decided exactly.

    It is iff the support digraph is strongly connected and aperiodic; for a doubly stochastic matrix that is
    exactly ``mixing_rate(a) < 1``. Strong connectivity: forward and backward BFS from agent 0. The period is the
    gcd of ``level[l] + 1 - level[k]`` over all edges (BFS levels from agent 0); a self-loop makes it 1 at once.
    O(K^2) numpy work on a boolean K x K mask, no eigenvalues."""
    k = support.shape[0]
    level = _reach(support)
    if (level < 0).any():
        return False  # some agent is unreachable from agent 0: reducible
    if (_reach(_transposed(support)) < 0).any():  # BFS on the transpose's rows, not strided columns
        return False  # agent 0 is unreachable from some agent: reducible
    if support.diagonal().any():
        return True  # strongly connected with a self-loop: period 1
    period = 0
    rows = max(1, (1 << 22) // max(k, 1))  # bound the index arrays to ~4M edges at a time
    for start in range(0, k, rows):
        src, dst = np.nonzero(support[start:start + rows])
        if src.size:
            period = math.gcd(period, int(np.gcd.reduce(level[src + start] + 1 - level[dst])))
        if period == 1:
            return True
    return False


def check_weights(a: np.ndarray, graph: nx.Graph | None = None, primitive: bool = True) -> None:
    """Raise ``ValueError`` unless ``a`` is a valid combination matrix (for ``graph``, if given). O(K^2).
    Valid: finite, non-negative, doubly stochastic, supported on the graph's edges and the diagonal, with a
    symmetric support (an agent takes a neighbour's state iff the neighbour takes its own), and primitive.
    ``primitive=False``: a base matrix a schedule never combines with may leave the agents apart."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"combination matrix must be square, got shape {a.shape}")
    k = a.shape[0]
    if graph is not None and graph.number_of_nodes() != k:
        raise ValueError(f"combination matrix is {k}x{k}, but the graph has {graph.number_of_nodes()} agents")
    col = a.sum(axis=0)  # one pass over A each for the sums, the minimum and the support mask
    if not np.isfinite(col).all():
        j = int(np.flatnonzero(~np.isfinite(col))[0])
        bad = np.flatnonzero(~np.isfinite(a[:, j]))
        if bad.size:
            raise ValueError(f"combination matrix has a non-finite weight A[{bad[0]}, {j}] = {a[bad[0], j]}")
    if a.min() < -_TOL:
        l, j = np.argwhere(a < -_TOL)[0]
        raise ValueError(f"combination matrix has a negative weight A[{l}, {j}] = {a[l, j]:.3g}")
    if not np.allclose(col, 1.0, atol=1e-9):
        j = int(np.argmax(abs(col - 1)))
        raise ValueError(f"combination matrix column {j} sums to {col[j]:.12g}, not 1 (not left-stochastic)")
    row = a.sum(axis=1)
    if not np.allclose(row, 1.0, atol=1e-9):
        l = int(np.argmax(abs(row - 1)))
        raise ValueError(f"combination matrix row {l} sums to {row[l]:.12g}, not 1 (not doubly stochastic)")
    support = a > _TOL
    if graph is not None:
        allowed = np.eye(k, dtype=bool)
        edges = np.array(list(graph.edges), dtype=np.int64).reshape(-1, 2)
        allowed[edges[:, 0], edges[:, 1]] = allowed[edges[:, 1], edges[:, 0]] = True
        np.greater(support, allowed, out=allowed)  # in place: support outside the graph's edges and diagonal
        if allowed.any():
            l, j = np.argwhere(allowed)[0]
            raise ValueError(f"A[{l}, {j}] = {a[l, j]:.3g} but agents {l} and {j} are not neighbours")
        del allowed
    # A one-way pair: under torchrun agent k waits for l's state, but l (whose column lacks k) never sends it.
    one_way = _transposed(support)
    np.greater(support, one_way, out=one_way)  # in place: support[l, j] and not support[j, l]
    if one_way.any():
        l = int(np.argmax(one_way.any(axis=1)))
        j = int(np.argmax(one_way[l]))
        raise ValueError(f"A[{l}, {j}] > 0 but A[{j}, {l}] = 0: a neighbour pair must exchange both ways (agent {j} "
                         f"takes agent {l}'s state, agent {l} takes nothing from agent {j}); make the support "
                         f"symmetric")
    del one_way
    if primitive and k > 1 and not support_is_primitive(support):
        raise ValueError("combination matrix is not primitive (lambda_2 = 1): the agents would never agree")


def first_asymmetry(a: np.ndarray, tol: float = _TOL) -> tuple[int, int] | None:
    """The first ``(l, j)`` (row-major) with ``|A[l, j] - A[j, l]| > tol``, or ``None`` when ``a`` is symmetric.

    O(K^2), in row blocks of about 4M entries, so no K x K temporary is allocated."""
    k = a.shape[0]
    rows = max(1, (1 << 22) // max(k, 1))
    for start in range(0, k, rows):
        stop = min(start + rows, k)
        bad = np.abs(a[start:stop] - a[:, start:stop].T) > tol
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            return start + i, int(np.argmax(bad[i]))
    return None


@dataclass(frozen=True)
class CombinePlan:
    """What one agent needs from the weight matrix: its own weight and its neighbours' (``A[:, k]``)."""

    agent: int
    self_weight: float
    neighbors: tuple[int, ...]  #: ascending agent ids, excluding ``agent``
    neighbor_weights: tuple[float, ...]  #: ``A[l, agent]`` for each neighbour ``l``

    @property
    def degree(self) -> int:
        return len(self.neighbors)


def combine_plan(a: np.ndarray, agent: int) -> CombinePlan:
    """Agent ``agent``'s column of ``a`` as a neighbour list (the only part of A an agent ever sees)."""
    col = a[:, agent]
    nbrs = tuple(int(l) for l in np.flatnonzero(col > 0) if l != agent)
    return CombinePlan(agent, float(col[agent]), nbrs, tuple(float(col[l]) for l in nbrs))
