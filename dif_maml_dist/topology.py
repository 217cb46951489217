"""Communication graphs and combination weights. Pure: no torch, no processes.

Weight-matrix convention, used everywhere in this project: ``A[l, k]`` is the weight agent ``k`` gives to
agent ``l``'s state, so agent k combines ``w_k = sum_l A[l, k] * phi_l`` (i.e. ``W = A.T @ Phi`` for
stacked states). Columns sum to one; the rules here are symmetric, so rows do too (doubly stochastic).
"""

from __future__ import annotations

import io

from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from .config import TopologyConfig

#: Edges of the 6-agent network of the paper's experiments (as in the authors' public code).
PAPER6_EDGES = ((0, 2), (1, 2), (2, 3), (2, 4), (3, 4), (4, 5))
DEFAULT_NUM_AGENTS = 6
_ER_MAX_DRAWS = 1000
_TOL = 1e-12


def read_edge_list(path: str | Path, num_agents: int | None = None) -> nx.Graph:
    """Read ``u v`` lines (integers, ``#`` comments, blank lines allowed) into a graph on nodes ``0..K-1``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"edge list file {str(path)!r} does not exist; set topology.edge_list to a readable file")
    edges: list[tuple[int, int, int]] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 2:
                raise ValueError
            u, v = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected two node ids 'u v', got {raw.strip()!r}") from None
        edges.append((u, v, lineno))
    if not edges:
        raise ValueError(f"edge list file {path} holds no edges")
    k = num_agents if num_agents is not None else max(max(u, v) for u, v, _ in edges) + 1
    graph = nx.Graph()
    graph.add_nodes_from(range(k))
    for u, v, lineno in edges:
        for node in (u, v):
            if not 0 <= node < k:
                raise ValueError(f"{path}:{lineno}: node {node} does not exist; the topology has {k} agents "
                                 f"(nodes 0..{k - 1}, set by topology.num_agents)")
        if u == v:
            raise ValueError(f"{path}:{lineno}: self-loop {u}-{v}; every agent already includes itself")
        graph.add_edge(u, v)
    return graph


def build_graph(cfg: TopologyConfig) -> nx.Graph:
    """The undirected graph named by ``cfg``, nodes ``0..K-1``. Raises ``ValueError`` if it is not connected."""
    k = cfg.num_agents if cfg.num_agents is not None else DEFAULT_NUM_AGENTS
    name = cfg.name
    if name == "paper6":
        if cfg.num_agents not in (None, 6):
            raise ValueError(f"topology=paper6 has exactly 6 agents, but topology.num_agents={cfg.num_agents}")
        graph = nx.Graph(PAPER6_EDGES)
    elif name == "ring":
        graph = nx.cycle_graph(k) if k > 2 else nx.path_graph(k)
    elif name == "complete":
        graph = nx.complete_graph(k)
    elif name == "star":
        graph = nx.star_graph(k - 1)
    elif name in ("grid", "torus"):
        if cfg.num_agents is not None and cfg.num_agents != cfg.rows * cfg.cols:
            raise ValueError(f"topology={name} with rows={cfg.rows}, cols={cfg.cols} has {cfg.rows * cfg.cols} "
                             f"agents, but topology.num_agents={cfg.num_agents}")
        grid = nx.grid_2d_graph(cfg.rows, cfg.cols, periodic=(name == "torus"))
        # Row-major numbering: agent r*cols + c sits at (r, c).
        graph = nx.relabel_nodes(grid, {(r, c): r * cfg.cols + c for r, c in grid.nodes})
    elif name == "erdos_renyi":
        for draw in range(_ER_MAX_DRAWS):
            graph = nx.gnp_random_graph(k, cfg.edge_prob, seed=cfg.graph_seed + draw)
            if nx.is_connected(graph):
                break
        else:
            raise ValueError(f"no connected Erdos-Renyi graph with {k} agents and edge_prob={cfg.edge_prob} in "
                             f"{_ER_MAX_DRAWS} draws; raise topology.edge_prob")
    elif name == "edge_list":
        if not cfg.edge_list:
            raise ValueError("topology=edge_list needs a file: add topology.edge_list=PATH")
        graph = read_edge_list(cfg.edge_list, cfg.num_agents)
    else:
        raise ValueError(f"unknown topology {name!r}")
    graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    if graph.number_of_nodes() > 1 and not nx.is_connected(graph):
        parts = sorted(sorted(c) for c in nx.connected_components(graph))
        raise ValueError(f"topology {name!r} is disconnected (components {parts}); agents in different components "
                         f"can never agree: add edges")
    return graph


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


def mixing_rate(a: np.ndarray) -> float:
    """lambda_2 = spectral radius of ``A.T - 11^T/K``: how fast repeated combination reaches consensus."""
    k = a.shape[0]
    return float(max(abs(np.linalg.eigvals(a.T - np.full((k, k), 1.0 / k)))))


def check_weights(a: np.ndarray, graph: nx.Graph | None = None) -> None:
    """Raise ``ValueError`` unless ``a`` is a valid combination matrix (for ``graph``, if given)."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"combination matrix must be square, got shape {a.shape}")
    if (a < -_TOL).any():
        l, k = np.argwhere(a < -_TOL)[0]
        raise ValueError(f"combination matrix has a negative weight A[{l}, {k}] = {a[l, k]:.3g}")
    col = a.sum(axis=0)
    if not np.allclose(col, 1.0, atol=1e-9):
        k = int(np.argmax(abs(col - 1)))
        raise ValueError(f"combination matrix column {k} sums to {col[k]:.12g}, not 1 (not left-stochastic)")
    row = a.sum(axis=1)
    if not np.allclose(row, 1.0, atol=1e-9):
        l = int(np.argmax(abs(row - 1)))
        raise ValueError(f"combination matrix row {l} sums to {row[l]:.12g}, not 1 (not doubly stochastic)")
    if graph is not None:
        for l, k in np.argwhere(a > _TOL):
            if l != k and not graph.has_edge(int(l), int(k)):
                raise ValueError(f"A[{l}, {k}] = {a[l, k]:.3g} but agents {l} and {k} are not neighbours")
    if a.shape[0] > 1 and not mixing_rate(a) < 1.0 - 1e-12:
        raise ValueError("combination matrix is not primitive (lambda_2 = 1): the agents would never agree")


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


@dataclass(frozen=True)
class Topology:
    """A checked graph with its combination matrix."""

    name: str
    graph: nx.Graph
    weights: np.ndarray  #: A, in the project's convention (column k = what agent k combines)
    lambda2: float

    @property
    def num_agents(self) -> int:
        return self.graph.number_of_nodes()


def read_weight_matrix(path: str | Path, graph: nx.Graph) -> np.ndarray:
    """A user's combination matrix from a text file, checked against ``graph`` (``ValueError`` naming the file)."""
    path = Path(path)
    try:
        text = path.read_text()
        a = np.loadtxt(io.StringIO(text.replace(",", " ")), dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the weight matrix {path}: {err}") from None
    k = graph.number_of_nodes()
    if a.shape != (k, k):
        raise ValueError(f"{path}: weight matrix is {a.shape[0]}x{a.shape[1]}, but the topology has {k} agents")
    try:
        check_weights(a, graph)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return a


def build_topology(cfg: TopologyConfig) -> Topology:
    """Graph + weights + checks, from config."""
    graph = build_graph(cfg)
    if cfg.weights == "file":
        a = read_weight_matrix(cfg.weight_matrix, graph)
        return Topology(cfg.name, graph, a, mixing_rate(a))
    if cfg.weights not in WEIGHT_RULES:
        raise ValueError(f"unknown topology.weights {cfg.weights!r}; choose one of: {', '.join(WEIGHT_RULES)}, file")
    a = WEIGHT_RULES[cfg.weights](graph)
    check_weights(a, graph)
    return Topology(cfg.name, graph, a, mixing_rate(a))


def strategy_weights(strategy: str, topology: Topology) -> np.ndarray:
    """The combination matrix a strategy effectively uses: A, 11^T/K (centralized) or I (non-cooperative)."""
    k = topology.num_agents
    if strategy == "dif_maml":
        return topology.weights
    if strategy == "centralized":
        return np.full((k, k), 1.0 / k)
    if strategy == "noncooperative":
        return np.eye(k)
    raise ValueError(f"unknown strategy {strategy!r}")
