"""Communication graphs and combination weights. Pure: no torch, no processes.

Weight-matrix convention, used everywhere in this project: ``A[l, k]`` is the weight agent ``k`` gives to
agent ``l``'s state, so agent k combines ``w_k = sum_l A[l, k] * phi_l`` (i.e. ``W = A.T @ Phi`` for
stacked states). Columns sum to one; the rules here are symmetric, so rows do too (doubly stochastic).

Cost: the weight matrix is dense (K x K float64), so memory grows as K^2; ``build_topology`` refuses up front
(``check_size``) a K whose matrix cannot fit. The checks are O(K^2) at most; the exact spectrum behind
``mixing_rate`` is O(K^3) and is skipped (``None``) above ``EXACT_SPECTRUM_MAX_AGENTS`` agents.
"""

from __future__ import annotations

import heapq
import io
import math
import os
import warnings

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

#: Above this many agents ``mixing_rate`` returns ``None`` instead of an O(K^3) eigendecomposition that would
#: hold the start of a run for minutes (timings in docs/notes.md).
EXACT_SPECTRUM_MAX_AGENTS = 2048
#: The same cap for a non-symmetric matrix (user weight files, directed schedules): the general eigensolver
#: ``eigvals`` is several times slower than the symmetric ``eigvalsh``.
EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC = 1024
#: ``check_size`` budget, in dense K x K float64 matrices: A itself plus, at the peak (``mixing_rate``), the
#: shifted copy ``A.T - 1/K`` and LAPACK's working copy of it, plus one more for the caller (e.g.
#: ``strategy_weights`` or a simulator's copy). The boolean masks of ``check_weights`` are 1/8 of one each.
_DENSE_COPIES = 4
#: How many components a "disconnected" message lists, and how many node ids of each.
_SHOW_COMPONENTS = 3
_SHOW_IDS = 5


# ----------------------------------------------------------------------------------------------------- files


def _read_text(path: Path, what: str, option: str, holds: str) -> str:
    """A user's text file as ``str``; every failure is one ``ValueError`` line naming the file and the fix."""
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; set {option} to a file ({holds}), not a folder")
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist; set {option} to a readable file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ValueError(f"{what} {str(path)!r} is not a regular file; set {option} to a plain text file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err.strerror or err}; set {option} to a readable "
                         f"file") from None
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x}); it must be a "
                         f"plain text file: save it as UTF-8 (or ASCII)") from None


def _read_edges(path: Path) -> list[tuple[int, int, int]]:
    """``(u, v, line)`` for each edge line of an edge-list file (syntax checked, ids not yet)."""
    text = _read_text(path, "edge list file", "topology.edge_list", "one 'u v' edge per line")
    edges: list[tuple[int, int, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 2:
                raise ValueError
            u, v = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected two node ids 'u v', got {raw.strip()[:60]!r}") from None
        edges.append((u, v, lineno))
    if not edges:
        raise ValueError(f"edge list file {path} holds no edges")
    return edges


def _inferred_num_agents(path: Path, edges: list[tuple[int, int, int]]) -> int:
    """K = largest id + 1, refusing ids that would leave agents without any edge (a typo such as ``2 999999``).

    With K inferred, an id in ``0..K-1`` that no edge names is an isolated agent, so the graph could only be
    disconnected; saying so here costs O(E) and never builds a graph with a million isolated nodes."""
    for u, v, lineno in edges:
        if min(u, v) < 0:
            raise ValueError(f"{path}:{lineno}: node {min(u, v)} does not exist; node ids are 0..K-1")
    u, v, top_line = max(edges, key=lambda e: max(e[0], e[1]))
    top = max(u, v)
    k = top + 1
    used = sorted({n for u, v, _ in edges for n in (u, v)})
    if len(used) < k:
        missing: list[int] = []
        expected = 0
        for n in used:  # the first few gaps, without materialising 0..K-1
            while expected < n and len(missing) < 3:
                missing.append(expected)
                expected += 1
            expected = n + 1
            if len(missing) == 3:
                break
        more = f", ... ({k - len(used)} in all)" if k - len(used) > len(missing) else ""
        raise ValueError(f"{path}:{top_line}: node id {top} makes K = {k} agents (ids 0..K-1; the largest id sets "
                         f"K) but only {len(used)} ids appear in edges (missing: {', '.join(map(str, missing))}"
                         f"{more}); fix a mistyped id or renumber the nodes 0..K-1")
    return k


def read_edge_list(path: str | Path, num_agents: int | None = None) -> nx.Graph:
    """Read ``u v`` lines (integers, ``#`` comments, blank lines allowed) into a graph on nodes ``0..K-1``.

    K is ``num_agents`` if given, else the largest id + 1 (then every id 0..K-1 must appear in some edge)."""
    path = Path(path)
    edges = _read_edges(path)
    k = num_agents if num_agents is not None else _inferred_num_agents(path, edges)
    source = "set by topology.num_agents" if num_agents is not None else "the largest id + 1"
    for u, v, lineno in edges:
        for node in (u, v):
            if not 0 <= node < k:
                raise ValueError(f"{path}:{lineno}: node {node} does not exist; the topology has {k} agents "
                                 f"(nodes 0..{k - 1}, {source})")
        if u == v:
            raise ValueError(f"{path}:{lineno}: self-loop {u}-{v}; every agent already includes itself")
    check_size(k)
    graph = nx.Graph()
    graph.add_nodes_from(range(k))
    graph.add_edges_from((u, v) for u, v, _ in edges)
    return graph


# -------------------------------------------------------------------------------------------- size and graph


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes (the cgroup v2 limit if lower); ``None`` where it cannot be told."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            mem = min(mem, int(limit))
    except OSError:
        pass
    return mem if mem > 0 else None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_size(num_agents: int) -> None:
    """Refuse (one ``ValueError`` line) a K whose dense K x K weight matrices cannot fit in memory.

    Cheap: arithmetic only, so call it before building anything K x K (``build_topology`` does)."""
    k = num_agents
    if k < 1:
        raise ValueError(f"the topology needs at least 1 agent, got {k}")
    need = k * k * 8 * _DENSE_COPIES
    mem = physical_memory_bytes()
    if mem is not None and need > mem:
        k_max = math.isqrt(mem // (8 * _DENSE_COPIES))
        raise ValueError(f"{k} agents need about {_gib(need)} ({_DENSE_COPIES} dense {k}x{k} float64 weight "
                         f"matrices of {_gib(k * k * 8)}), but this machine has {_gib(mem)} of memory: use fewer "
                         f"agents (at most about {k_max} here)")


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
        return _inferred_num_agents(path, _read_edges(path))
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


def build_graph(cfg: TopologyConfig) -> nx.Graph:
    """The undirected graph named by ``cfg``, nodes ``0..K-1``. Raises ``ValueError`` if it is not connected (and
    ``cfg.schedule`` draws its rounds from it: ``schedules.uses_base_edges``).

    O(K + E) (Erdos-Renyi: O(K^2) per draw); it never builds a K x K matrix, but a complete graph holds
    K^2/2 edges: call ``check_size(num_agents_of(cfg))`` first, as ``build_topology`` does."""
    _check_fixed_size(cfg)
    k = cfg.num_agents if cfg.num_agents is not None else DEFAULT_NUM_AGENTS
    name = cfg.name
    if name == "paper6":
        graph = nx.Graph(PAPER6_EDGES)
    elif name == "ring":
        graph = nx.cycle_graph(k) if k > 2 else nx.path_graph(k)
    elif name == "complete":
        graph = nx.complete_graph(k)
    elif name == "star":
        graph = nx.star_graph(k - 1)
    elif name in ("grid", "torus"):
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
    from .schedules import uses_base_edges

    graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    # A schedule that pairs agents by id alone (one_peer_exponential) reads only K off the base graph.
    if graph.number_of_nodes() > 1 and uses_base_edges(cfg.schedule) and not nx.is_connected(graph):
        raise ValueError(f"topology {name!r} is disconnected ({_components_summary(graph)}); agents in different "
                         f"components can never agree: add edges")
    return graph


# ----------------------------------------------------------------------------------------------------- weights


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
    lambda_2 < 1 (the agents agree) does not need it: ``is_primitive`` decides that exactly in O(K^2)."""
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


def _support_is_primitive(support: np.ndarray) -> bool:
    """``is_primitive`` on the boolean support matrix itself (``support[l, k]``: edge ``l -> k``)."""
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


def is_primitive(a: np.ndarray, tol: float = _TOL) -> bool:
    """Whether the nonnegative square ``a`` is primitive (some power entrywise positive), decided exactly.

    ``a`` is primitive iff its support digraph (edge ``l -> k`` where ``a[l, k] > tol``, self-loops included) is
    strongly connected and aperiodic. For a doubly stochastic ``a`` that is exactly ``mixing_rate(a) < 1``.
    Strong connectivity: forward and backward BFS from agent 0. The period is the gcd of
    ``level[l] + 1 - level[k]`` over all edges (BFS levels from agent 0); a self-loop makes it 1 at once.
    O(K^2) numpy work on a boolean K x K mask, no eigenvalues."""
    return _support_is_primitive(np.asarray(a) > tol)


def check_weights(a: np.ndarray, graph: nx.Graph | None = None, primitive: bool = True) -> None:
    """Raise ``ValueError`` unless ``a`` is a valid combination matrix (for ``graph``, if given). O(K^2).
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
    if primitive and k > 1 and not _support_is_primitive(support):
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
    #: ``mixing_rate(weights)``; ``None`` = not computed (more agents than ``EXACT_SPECTRUM_MAX_AGENTS``).
    #: The weights are checked primitive either way, i.e. lambda_2 < 1, unless the schedule ignores the base
    #: graph's edges (``schedules.uses_base_edges``): then a disconnected base graph has lambda_2 = 1.
    lambda2: float | None

    @property
    def num_agents(self) -> int:
        return self.graph.number_of_nodes()


def _weight_rows_problem(text: str, path: Path, k: int) -> str | None:
    """Where a weight file that ``np.loadtxt`` refused goes wrong, as ``PATH:LINE: ...`` (None: not found)."""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        values = raw.split("#", 1)[0].replace(",", " ").split()
        if not values:
            continue
        for token in values:
            try:
                float(token)
            except ValueError:
                return f"{path}:{lineno}: {token[:40]!r} is not a number; the weight matrix holds numbers only"
        if len(values) != k:
            return f"{path}:{lineno}: row has {len(values)} values, expected {k} (one per agent)"
    return None


def read_weight_matrix(path: str | Path, graph: nx.Graph) -> np.ndarray:
    """A user's combination matrix from a text file, checked against ``graph`` (``ValueError`` naming the file)."""
    if path is None or str(path) == "":
        raise ValueError("topology.weights=file needs the matrix: add topology.weight_matrix=PATH")
    path = Path(path)
    text = _read_text(path, "weight matrix file", "topology.weight_matrix", "K rows of K weights")
    k = graph.number_of_nodes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below
            a = np.loadtxt(io.StringIO(text.replace(",", " ")), dtype=np.float64, ndmin=2)
    except ValueError as err:
        problem = _weight_rows_problem(text, path, k)
        raise ValueError(problem or f"cannot read the weight matrix {path}: {' '.join(str(err).split())}") from None
    if a.size == 0:
        raise ValueError(f"{path}: the weight matrix file holds no numbers; expected {k} rows of {k} values")
    if a.shape != (k, k):
        raise ValueError(f"{path}: weight matrix is {a.shape[0]}x{a.shape[1]}, but the topology has {k} agents")
    try:
        check_weights(a, graph)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return a


def build_topology(cfg: TopologyConfig) -> Topology:
    """Graph + weights + checks, from config. Refuses (``check_size``) before allocating what cannot fit."""
    check_size(num_agents_of(cfg))
    if cfg.weights != "file" and cfg.weights not in WEIGHT_RULES:
        raise ValueError(f"unknown topology.weights {cfg.weights!r}; choose one of: {', '.join(WEIGHT_RULES)}, file")
    graph = build_graph(cfg)
    if cfg.weights == "file":
        a = read_weight_matrix(cfg.weight_matrix, graph)
    else:
        from .schedules import uses_base_edges

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
