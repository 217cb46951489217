"""The communication graph of a run: built from the config (a named graph or the user's edge list), with the
strategy's combination weights (``weights.py``). Pure: no torch, no processes."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import networkx as nx
import numpy as np

from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.graphs.files import inferred_num_agents, read_edge_list, read_edges, read_weight_matrix
from dif_maml_dist.graphs.memory import check_size
from dif_maml_dist.graphs.schedules import uses_base_edges
from dif_maml_dist.graphs.weights import WEIGHT_RULES, check_weights, mixing_rate

#: Edges of the 6-agent network of the paper's experiments (as in the authors' public code).
PAPER6_EDGES = ((0, 2), (1, 2), (2, 3), (2, 4), (3, 4), (4, 5))
DEFAULT_NUM_AGENTS = 6
_ER_MAX_DRAWS = 1000
_TOL = 1e-12
#: How many components a "disconnected" message lists, and how many node ids of each.
_SHOW_COMPONENTS = 3
_SHOW_IDS = 5


def _check_fixed_size(cfg: TopologyConfig) -> None:
    if cfg.name == "paper6" and cfg.num_agents not in (None, 6):
        raise ValueError(f"topology=paper6 has exactly 6 agents, but topology.num_agents={cfg.num_agents}")
    if cfg.name in ("grid", "torus") and cfg.num_agents is not None and cfg.num_agents != cfg.rows * cfg.cols:
        raise ValueError(f"topology={cfg.name} with rows={cfg.rows}, cols={cfg.cols} has {cfg.rows * cfg.cols} "
                         f"agents, but topology.num_agents={cfg.num_agents}")


def num_agents_of(cfg: TopologyConfig) -> int:
    """The number of agents ``cfg`` describes, without building the graph or any K x K matrix.

    Arithmetic for the named topologies; for ``edge_list`` without ``num_agents`` it reads the file (O(E))."""
    _check_fixed_size(cfg)
    if cfg.name == "paper6":
        return 6
    if cfg.name in ("grid", "torus"):
        return cfg.rows * cfg.cols
    if cfg.name in ("ring", "complete", "star", "erdos_renyi"):
        return cfg.num_agents if cfg.num_agents is not None else DEFAULT_NUM_AGENTS
    if cfg.name == "edge_list":
        if not cfg.edge_list:
            raise ValueError("topology=edge_list needs a file: add topology.edge_list=PATH")
        if cfg.num_agents is not None:
            return cfg.num_agents
        path = Path(cfg.edge_list)
        return inferred_num_agents(path, read_edges(path))
    raise ValueError(f"unknown topology {cfg.name!r}")


def _components_summary(graph: nx.Graph) -> str:
    """The components, in full when few and small (``components [[0, 1], [2, 3]]``), else the first few."""
    comps = sorted(nx.connected_components(graph), key=min)
    if len(comps) <= _SHOW_COMPONENTS and all(len(c) <= 2 * _SHOW_IDS for c in comps):
        return f"components {[sorted(c) for c in comps]}"

    def one(c: set) -> str:
        ids = ", ".join(map(str, heapq.nsmallest(_SHOW_IDS, c)))
        return f"[{ids}, ...] ({len(c)} agents)" if len(c) > _SHOW_IDS else f"[{ids}]"

    more = f" and {len(comps) - _SHOW_COMPONENTS} more" if len(comps) > _SHOW_COMPONENTS else ""
    return f"{len(comps)} components: {', '.join(one(c) for c in comps[:_SHOW_COMPONENTS])}{more}"


def _grid(cfg: TopologyConfig, k: int, periodic: bool) -> nx.Graph:
    grid = nx.grid_2d_graph(cfg.rows, cfg.cols, periodic=periodic)
    # Row-major numbering: agent r*cols + c sits at (r, c).
    return nx.relabel_nodes(grid, {(r, c): r * cfg.cols + c for r, c in grid.nodes})


def _erdos_renyi(cfg: TopologyConfig, k: int) -> nx.Graph:
    for draw in range(_ER_MAX_DRAWS):
        graph = nx.gnp_random_graph(k, cfg.edge_prob, seed=cfg.graph_seed + draw)
        if nx.is_connected(graph):
            return graph
    raise ValueError(f"no connected Erdos-Renyi graph with {k} agents and edge_prob={cfg.edge_prob} in "
                     f"{_ER_MAX_DRAWS} draws; raise topology.edge_prob")


def _edge_list(cfg: TopologyConfig, k: int) -> nx.Graph:
    if not cfg.edge_list:
        raise ValueError("topology=edge_list needs a file: add topology.edge_list=PATH")
    return read_edge_list(cfg.edge_list, cfg.num_agents)


#: ``topology=NAME`` -> its graph from the config and the number of agents K (config validation reads the names)
GRAPHS: dict[str, Callable[[TopologyConfig, int], nx.Graph]] = {
    "paper6": lambda cfg, k: nx.Graph(PAPER6_EDGES),
    "ring": lambda cfg, k: nx.cycle_graph(k) if k > 2 else nx.path_graph(k),
    "complete": lambda cfg, k: nx.complete_graph(k),
    "star": lambda cfg, k: nx.star_graph(k - 1),
    "grid": lambda cfg, k: _grid(cfg, k, periodic=False),
    "torus": lambda cfg, k: _grid(cfg, k, periodic=True),
    "erdos_renyi": _erdos_renyi,
    "edge_list": _edge_list,
}


def build_graph(cfg: TopologyConfig) -> nx.Graph:
    """The undirected graph named by ``cfg``, nodes ``0..K-1``. Raises ``ValueError`` if it is not connected (and
    ``cfg.schedule`` draws its rounds from it: ``schedules.uses_base_edges``).

    O(K + E) (Erdos-Renyi: O(K^2) per draw); it never builds a K x K matrix, but a complete graph holds
    K^2/2 edges: call ``check_size(num_agents_of(cfg))`` first, as ``build_topology`` does."""
    _check_fixed_size(cfg)
    name = cfg.name
    if name not in GRAPHS:
        raise ValueError(f"unknown topology {name!r}; choose one of: {', '.join(GRAPHS)}")
    graph = GRAPHS[name](cfg, cfg.num_agents if cfg.num_agents is not None else DEFAULT_NUM_AGENTS)
    graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    # A schedule that pairs agents by id alone (one_peer_exponential) reads only K off the base graph.
    if graph.number_of_nodes() > 1 and uses_base_edges(cfg.schedule) and not nx.is_connected(graph):
        raise ValueError(f"topology {name!r} is disconnected ({_components_summary(graph)}); agents in different "
                         f"components can never agree: add edges")
    return graph


# ----------------------------------------------------------------------------------------------------- weights



@dataclass(frozen=True)
class Topology:
    """A checked graph with its combination matrix."""

    name: str
    graph: nx.Graph
    weights: np.ndarray  #: A, in the project's convention (column k = what agent k combines)
    #: ``mixing_rate(weights)``; ``None`` = not computed (more agents than ``EXACT_SPECTRUM_MAX_AGENTS``).
    #: The weights are checked primitive either way, i.e. lambda_2 < 1, unless the schedule ignores the base
    #: graph's edges (``schedules.uses_base_edges``): then a disconnected base graph has lambda_2 = 1.
    lambda2: float | None

    @property
    def num_agents(self) -> int:
        return self.graph.number_of_nodes()



def build_topology(cfg: TopologyConfig) -> Topology:
    """Graph + weights + checks, from config. Refuses (``check_size``) before allocating what cannot fit."""
    check_size(num_agents_of(cfg))
    if cfg.weights != "file" and cfg.weights not in WEIGHT_RULES:
        raise ValueError(f"unknown topology.weights {cfg.weights!r}; choose one of: {', '.join(WEIGHT_RULES)}, file")
    graph = build_graph(cfg)
    if cfg.weights == "file":
        a = read_weight_matrix(cfg.weight_matrix, graph)
    else:
        a = WEIGHT_RULES[cfg.weights](graph)
        check_weights(a, graph, primitive=uses_base_edges(cfg.schedule))
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
