"""Graphs that change from one combination round to the next. Pure: no torch, no processes.

A round's graph is a function of (base graph, schedule, run seed, round number) alone, so every agent derives
the same graph and weights without a coordinator or an extra message. Round ``r`` counts combination rounds
from 0 (with ``strategy.combine_every=τ`` the round of iteration ``i`` is ``i/τ - 1``). Weights follow the
project's convention (``A[l, k]``: what agent k gives agent l; see ``weights.py``) and are computed each
round by the configured rule on the round's graph; an agent with no peer in a round keeps its state.

- ``static``: the base graph and its weights every round (Dif-MAML as in the paper).
- ``one_peer_exponential``: every agent talks to at most one peer, at distance ``d = 2^(r mod n)``,
  ``n = ceil(log2 K)`` (BlueFog's one-peer exponential graph, made undirected). Pairing: agent ``k`` pairs with
  ``k + d`` when ``floor(k / d)`` is even and with ``k - d`` when it is odd; a partner outside ``0..K-1`` means
  no peer this round. Both ends compute the same pair. For K a power of two every agent has a peer in every round,
  and one period of n rounds (weights 1/2) averages the network exactly; it ignores the base graph's edges
  (only its number of agents counts, so the base graph may be disconnected: ``uses_base_edges``).
- ``random_matching``: a maximal matching of the base graph's edges, drawn each round (edges in a seeded random
  order, each taken if both ends are still free).
- ``resample``: each base edge is active with probability ``topology.active_prob`` each round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import networkx as nx
import numpy as np

from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.graphs.weights import (
    EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC,
    WEIGHT_RULES,
    CombinePlan,
    combine_plan,
    max_degree_weights,
    metropolis_weights,
    mixing_rate,
)
from dif_maml_dist.seeding import Stream, numpy_generator

#: ``topology.schedule=NAME``: how each round's graph is drawn from the base graph (config validation reads them)
SCHEDULES = ("static", "one_peer_exponential", "random_matching", "resample")
_NOT_COMPUTED = "not computed (too many agents for an exact spectrum, O(K^3))"
_MEASURE_ROUNDS = 200  #: rounds over which a random schedule's mixing rate is measured
_MEASURE_VECTORS = 8


def exponential_partner(agent: int, num_agents: int, r: int) -> Optional[int]:
    """``agent``'s peer in round ``r`` of the one-peer exponential schedule, or ``None`` (see the module doc)."""
    if num_agents < 2:
        return None
    d = 2 ** (r % math.ceil(math.log2(num_agents)))
    partner = agent + d if (agent // d) % 2 == 0 else agent - d
    return partner if 0 <= partner < num_agents else None


@dataclass(frozen=True, eq=False)  # hashed by identity: the per-round caches key on it
class GraphSchedule:
    """The graphs of every round. ``static_weights``: the base graph's checked weight matrix; ``rule``: how a
    dynamic round's graph gets its weights (Metropolis by default)."""

    name: str
    base: nx.Graph
    static_weights: np.ndarray
    seed: int = 0
    active_prob: float = 0.5
    rule: Optional[Callable[[nx.Graph], np.ndarray]] = None
    _edges: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _loops: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown topology.schedule {self.name!r}; choose one of: {', '.join(SCHEDULES)}")
        object.__setattr__(self, "_edges", tuple(sorted(tuple(sorted(e)) for e in self.base.edges)))
        object.__setattr__(self, "_loops", any(u == v for u, v in self._edges))

    @property
    def num_agents(self) -> int:
        return self.static_weights.shape[0]

    @property
    def is_static(self) -> bool:
        return self.name == "static"

    @property
    def period(self) -> Optional[int]:
        """Rounds after which the graphs repeat (``None``: random schedules never do)."""
        if self.name == "static":
            return 1
        if self.name == "one_peer_exponential":
            return max(1, math.ceil(math.log2(max(self.num_agents, 2))))
        return None

    def _rng(self, r: int) -> np.random.Generator:
        return numpy_generator(self.seed, Stream.SCHEDULE, r)

    def edges(self, r: int) -> tuple[tuple[int, int], ...]:
        """Round ``r``'s edges ``(u, v)`` with ``u < v``, ascending."""
        if self.name == "static":
            return self._edges
        if self.name == "one_peer_exponential":
            k = self.num_agents
            return tuple((a, p) for a in range(k) if (p := exponential_partner(a, k, r)) is not None and a < p)
        if self.name == "random_matching":
            order = self._rng(r).permutation(len(self._edges))
            busy: set[int] = set()
            chosen = []
            for i in order:
                u, v = self._edges[i]
                if u not in busy and v not in busy:
                    busy.update((u, v))
                    chosen.append((u, v))
            return tuple(sorted(chosen))
        draws = self._rng(r).random(len(self._edges))  # resample
        return tuple(e for e, x in zip(self._edges, draws) if x < self.active_prob)

    def graph(self, r: int) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(range(self.num_agents))
        g.add_edges_from(self.edges(r))
        return g

    def weights(self, r: int) -> np.ndarray:
        """Round ``r``'s combination matrix (``K x K``)."""
        if self.is_static:
            return self.static_weights
        return _round_weights(self, r)

    def plan(self, r: int, agent: int) -> CombinePlan:
        """What ``agent`` needs of round ``r``'s matrix: its neighbours and their weights (its column).

        A dynamic round's column is computed from the round's edges alone (O(K + E) once per round, cached, then
        O(degree) per agent), never from the K x K matrix, with the very floating-point values ``weights(r)``
        holds: the neighbour weights by the same expression, the self weight as ``1 - `` the neighbour weights
        added one by one in ascending agent order, as the dense rule's column sum adds them. A custom ``rule``
        (not Metropolis or maximum degree) or a base graph with self-loops falls back to the dense matrix."""
        if self.is_static:
            return _static_plan(self, agent)
        kind = _LOCAL_RULES.get(self.rule)
        if kind is None or self._loops:
            return combine_plan(self.weights(r), agent)
        adj = _round_adjacency(self, r)
        peers = adj.peers[adj.indptr[agent]:adj.indptr[agent + 1]]
        if kind == "metropolis":
            n_k = adj.size[agent]
            weights = tuple(float(1.0 / max(n_k, adj.size[l])) for l in peers)
        else:  # max_degree: max_degree_weights' expression, on the round's graph
            weights = (1.0 / (adj.max_degree + 1),) * len(peers)
        total = 0.0
        for w in weights:  # numpy's axis-0 sum of a C-ordered matrix adds row after row, zeros included
            total += w
        return CombinePlan(agent, float(1.0 - total), tuple(int(l) for l in peers), weights)

    def support(self) -> nx.Graph:
        """Every edge any round may use: the base graph, or the one-peer exponential pairs."""
        if self.name != "one_peer_exponential":
            return self.base
        g = nx.Graph()
        g.add_nodes_from(range(self.num_agents))
        for r in range(self.period):
            g.add_edges_from(self.edges(r))
        return g

    def mixing(self) -> tuple[Optional[float], str]:
        """How much one round contracts the disagreement, and how that was found: λ₂ of the static matrix; the
        period's product ``rho(prod A_r^T - 11^T/K)^(1/period)`` for the exponential schedule; for random ones,
        the measured geometric-mean decay of ``||X - mean||`` over 200 rounds from random starts, re-centred every
        round (``_measured_rate``: what it estimates and how well). ``None`` where
        an exact spectrum would take too long (``topology.EXACT_SPECTRUM_MAX_AGENTS``). Computed once per
        schedule: the start line and the summary report the same number, and it may take O(K^3)."""
        return _mixing(self)

    def _compute_mixing(self) -> tuple[Optional[float], str]:
        k = self.num_agents
        if k < 2:
            return 0.0, "single agent"
        if self.is_static:
            rate = mixing_rate(self.static_weights)
            return rate, "lambda_2 of A" if rate is not None else _NOT_COMPUTED
        if self.period is not None and k > EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC:
            return None, _NOT_COMPUTED
        if self.period is not None:
            product = np.eye(k)
            for r in range(self.period):
                product = self.weights(r).T @ product
            rho = max(abs(np.linalg.eigvals(product - np.full((k, k), 1.0 / k))))
            return float(rho ** (1.0 / self.period)), f"period product over {self.period} rounds"
        return _measured_rate(self.weights, k, self.seed)


def _measured_rate(weights: Callable[[int], np.ndarray], k: int, seed: int) -> tuple[float, str]:
    """A random schedule's mixing rate per round: the geometric mean over rounds ``r = 0..199`` of the contraction
    ``||P A_r^T X|| / ||X||`` (``P``: subtract the agents' average; Frobenius norm) of ``_MEASURE_VECTORS`` = 8
    random starts ``X`` (standard normal, seeded by ``seeding.Stream.MIXING``), re-centred and rescaled to norm 1 after
    every round. For doubly stochastic rounds that is ``(||X_200 - mean|| / ||X_0 - mean||)^(1/200)`` in exact
    arithmetic, the decay of the disagreement over 200 rounds; computed that way directly, the decay stalled where
    rounding of the average it carries (~1e-16 of the start) leaked back into the disagreement, and a graph that
    averages in a round or two reported ~0.69 instead of ~0. Accuracy: rounding adds ~1e-15 at most (a round that
    averages exactly reports ~1e-16, or 0 if the disagreement vanishes exactly); otherwise it is a 200-round
    sample of the asymptotic rate, low by a factor ``c^(1/200)`` where ``c`` is the starts' share along the
    slowest direction (a few percent at most where that direction dominates within 200 rounds; a graph whose
    slowest mode needs longer, e.g. a ring of hundreds, reports the faster early decay). O(200 K^2) work."""
    x = numpy_generator(seed, Stream.MIXING).standard_normal((k, _MEASURE_VECTORS))
    x -= x.mean(axis=0)
    x /= np.linalg.norm(x)
    log_decay = 0.0
    for r in range(_MEASURE_ROUNDS):
        x = weights(r).T @ x
        x -= x.mean(axis=0)
        norm = np.linalg.norm(x)
        if norm == 0.0:
            return 0.0, f"measured decay: exact average after {r + 1} rounds"
        log_decay += math.log(norm)
        x /= norm
    return math.exp(log_decay / _MEASURE_ROUNDS), f"measured decay over {_MEASURE_ROUNDS} rounds"


@lru_cache(maxsize=8)
def _mixing(schedule: GraphSchedule) -> tuple[Optional[float], str]:
    return schedule._compute_mixing()


@lru_cache(maxsize=8)
def _round_weights(schedule: GraphSchedule, r: int) -> np.ndarray:
    # Cached: in the simulator every agent asks for the same round's matrix (dense K x K: keep few).
    a = (schedule.rule or metropolis_weights)(schedule.graph(r))
    assert np.allclose(a.sum(axis=0), 1.0) and np.allclose(a.sum(axis=1), 1.0) and (a >= 0).all(), \
        f"round {r} of {schedule.name}: weights not doubly stochastic"
    return a


#: The weight rules ``plan`` computes one column of without the matrix (``None``: Metropolis, the default). Keyed by
#: the functions themselves, taken at import.
_LOCAL_RULES = {None: "metropolis", metropolis_weights: "metropolis", max_degree_weights: "max_degree"}


@dataclass(frozen=True)
class _RoundAdjacency:
    """Round ``r``'s graph as neighbour lists: agent k's peers are ``peers[indptr[k]:indptr[k + 1]]``, ascending."""

    indptr: np.ndarray
    peers: np.ndarray
    size: np.ndarray  #: neighbourhood sizes ``n = 1 + degree`` (float64, as ``metropolis_weights`` has them)
    max_degree: int


@lru_cache(maxsize=8)
def _round_adjacency(schedule: GraphSchedule, r: int) -> _RoundAdjacency:
    # Cached: in the simulator every agent asks for the same round. O(K + E) memory, no K x K matrix.
    e = np.array(schedule.edges(r), dtype=np.int64).reshape(-1, 2)
    src, dst = np.concatenate((e[:, 0], e[:, 1])), np.concatenate((e[:, 1], e[:, 0]))
    order = np.lexsort((dst, src))
    degree = np.bincount(src, minlength=schedule.num_agents)
    indptr = np.zeros(schedule.num_agents + 1, dtype=np.int64)
    np.cumsum(degree, out=indptr[1:])
    return _RoundAdjacency(indptr, dst[order], degree.astype(np.float64) + 1.0, int(degree.max(initial=0)))


@lru_cache(maxsize=4096)
def _static_plan(schedule: GraphSchedule, agent: int) -> CombinePlan:
    return combine_plan(schedule.static_weights, agent)


def static_schedule(weights: np.ndarray) -> GraphSchedule:
    """The static schedule of a weight matrix (its graph: the matrix's off-diagonal support)."""
    k = weights.shape[0]
    g = nx.Graph()
    g.add_nodes_from(range(k))
    g.add_edges_from((int(l), int(m)) for l, m in np.argwhere(weights > 0) if l < m)
    return GraphSchedule("static", g, np.asarray(weights, dtype=np.float64))


#: Schedules that never use the base graph's edges (only its number of agents): the base graph may be disconnected.
IGNORE_BASE_EDGES = frozenset({"one_peer_exponential"})


def uses_base_edges(schedule: str) -> bool:
    """Whether ``schedule``'s rounds are drawn from the base graph's edges (so the base graph must be connected)."""
    return schedule not in IGNORE_BASE_EDGES


def build_schedule(cfg: TopologyConfig, seed: int, graph: nx.Graph, weights: np.ndarray) -> GraphSchedule:
    """The configured schedule over ``graph``; ``weights``: the strategy's static matrix (A, 11^T/K or I)."""
    if cfg.schedule == "static":
        return GraphSchedule("static", graph, np.asarray(weights, dtype=np.float64))
    if cfg.weights not in WEIGHT_RULES:
        raise ValueError(f"topology.schedule={cfg.schedule} needs a weight rule ({', '.join(WEIGHT_RULES)}), "
                         f"not topology.weights={cfg.weights}")
    edges = graph.number_of_edges()
    if cfg.schedule == "resample" and edges and cfg.active_prob * edges < 1:
        # The floor of compression.ratio's kind: below one active edge per round on average, most rounds combine
        # nothing and the agents hardly ever average.
        raise ValueError(f"topology.active_prob={cfg.active_prob:g} keeps less than one of the graph's {edges} edges "
                         f"per round on average (most rounds would combine nothing); use at least 1/{edges} = "
                         f"{1 / edges:.3g}")
    return GraphSchedule(cfg.schedule, graph, np.asarray(weights, dtype=np.float64), seed, cfg.active_prob,
                         WEIGHT_RULES[cfg.weights])
