"""The user's graph files: edge lists and weight matrices, read with one-line errors naming the file, the
line and the fix."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import networkx as nx
import numpy as np

from dif_maml_dist.graphs.memory import check_size
from dif_maml_dist.graphs.weights import check_weights

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


def read_edges(path: Path) -> list[tuple[int, int, int]]:
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


def inferred_num_agents(path: Path, edges: list[tuple[int, int, int]]) -> int:
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
    edges = read_edges(path)
    k = num_agents if num_agents is not None else inferred_num_agents(path, edges)
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
