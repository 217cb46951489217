"""Graphs, combination weights and their checks (pure, one process)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

import dif_maml_dist.graphs.memory as memory
import dif_maml_dist.graphs.topology as topology
import dif_maml_dist.graphs.weights as weights
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.graphs.memory import check_size
from dif_maml_dist.graphs.topology import build_topology, num_agents_of, strategy_weights
from dif_maml_dist.graphs.weights import (
    check_weights,
    combine_plan,
    max_degree_weights,
    metropolis_weights,
    mixing_rate,
)
from tests.helpers import is_primitive

# The paper's graph, Metropolis rule worked out by hand from a_lk = 1/max(n_k, n_l), n = degree + 1:
# n = [2, 2, 5, 3, 4, 2]; diagonal = 1 - (sum of the column's other entries).
PAPER6_A = np.array([
    [0.80, 0.00, 0.20, 0.00, 0.00, 0.00],
    [0.00, 0.80, 0.20, 0.00, 0.00, 0.00],
    [0.20, 0.20, 0.20, 0.20, 0.20, 0.00],
    [0.00, 0.00, 0.20, 0.55, 0.25, 0.00],
    [0.00, 0.00, 0.20, 0.25, 0.30, 0.25],
    [0.00, 0.00, 0.00, 0.00, 0.25, 0.75],
])


def test_paper6_metropolis_matches_hand_computed_matrix():
    """Catches a wrong Metropolis formula (degree vs neighbourhood size, min vs max) or a transposed convention."""
    topo = build_topology(TopologyConfig(name="paper6"))
    np.testing.assert_allclose(topo.weights, PAPER6_A, atol=1e-15)
    # DESIGN.md quotes lambda_2 ~ 0.864 for this matrix (also in the paper's authors' setting).
    assert topo.lambda2 == pytest.approx(0.864, abs=5e-4)


@pytest.mark.parametrize("cfg, k, edges", [
    (TopologyConfig(name="ring", num_agents=7), 7, 7),
    (TopologyConfig(name="complete", num_agents=5), 5, 10),
    (TopologyConfig(name="star", num_agents=6), 6, 5),
    (TopologyConfig(name="grid", rows=2, cols=3), 6, 7),
    (TopologyConfig(name="torus", rows=3, cols=3), 9, 18),
    (TopologyConfig(name="erdos_renyi", num_agents=12, edge_prob=0.3, graph_seed=4), 12, None),
])
def test_named_topologies_give_valid_doubly_stochastic_weights(cfg, k, edges):
    """Catches a graph builder with the wrong size/shape or a weight rule that breaks double stochasticity."""
    topo = build_topology(cfg)
    a = topo.weights
    assert topo.num_agents == k
    if edges is not None:
        assert topo.graph.number_of_edges() == edges
    assert nx.is_connected(topo.graph)
    np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    assert (a >= 0).all()
    off_diagonal_support = {(int(l), int(j)) for l, j in np.argwhere(a > 0) if l != j}
    assert off_diagonal_support == {e for u, v in topo.graph.edges for e in ((u, v), (v, u))}
    assert 0 <= topo.lambda2 < 1


def test_complete_graph_metropolis_is_exact_average():
    """Metropolis on K_n gives 1/n everywhere (every n_k = n), so lambda_2 = 0: catches off-by-one in n_k."""
    a = metropolis_weights(nx.complete_graph(5))
    np.testing.assert_allclose(a, np.full((5, 5), 0.2), atol=1e-15)
    assert mixing_rate(a) == pytest.approx(0.0, abs=1e-12)


def test_max_degree_rule_on_star():
    """Star with 5 leaves: d_max = 5, so each edge gets 1/6, the hub keeps 1/6 and each leaf 5/6."""
    a = max_degree_weights(nx.star_graph(5))
    assert a[0, 1] == pytest.approx(1 / 6) and a[1, 0] == pytest.approx(1 / 6)
    assert a[0, 0] == pytest.approx(1 / 6) and a[3, 3] == pytest.approx(5 / 6)
    check_weights(a, nx.star_graph(5))


def test_erdos_renyi_is_seeded_and_connected():
    """Same seed -> same graph; another seed -> (here) another graph; sparse p still yields a connected graph."""
    def edges(seed, p=0.2):
        return sorted(build_topology(TopologyConfig(name="erdos_renyi", num_agents=15, edge_prob=p,
                                                    graph_seed=seed)).graph.edges)
    assert edges(3) == edges(3)
    assert edges(3) != edges(4)


def test_check_weights_rejects_invalid_matrices():
    """The checks must refuse what the algorithm cannot use; each case a different property."""
    g = nx.path_graph(3)
    # The authors' neighbourhood mean: rows sum to 1, but columns do not (not doubly stochastic).
    row_mean = np.array([[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 2, 1 / 2]])
    with pytest.raises(ValueError, match="column"):
        check_weights(row_mean, g)
    with pytest.raises(ValueError, match="negative"):
        check_weights(np.array([[1.5, -0.5, 0], [-0.5, 1.5, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="primitive"):
        check_weights(np.eye(3), g)
    full = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="not neighbours"):
        check_weights(full, g)


def test_disconnected_graph_is_rejected(tmp_path):
    """Two components can never agree: the error must say so and name them."""
    f = tmp_path / "two.txt"
    f.write_text("0 1\n2 3\n")
    with pytest.raises(ValueError, match=r"disconnected \(components \[\[0, 1\], \[2, 3\]\]\)"):
        build_topology(TopologyConfig(name="edge_list", edge_list=str(f)))


def test_edge_list_file_errors_name_file_and_line(tmp_path):
    """Missing nodes, garbage lines and missing files are reported with file:line, not a stack trace."""
    f = tmp_path / "g.txt"
    f.write_text("# a comment\n0 1\n1 2   # trailing comment\n\n2 7\n")
    with pytest.raises(ValueError, match=r"g\.txt:5: node 7 does not exist; the topology has 4 agents"):
        build_topology(TopologyConfig(name="edge_list", edge_list=str(f), num_agents=4))
    f.write_text("0 1\n1 two\n")
    with pytest.raises(ValueError, match=r"g\.txt:2: expected two node ids"):
        build_topology(TopologyConfig(name="edge_list", edge_list=str(f)))
    with pytest.raises(ValueError, match="does not exist"):
        build_topology(TopologyConfig(name="edge_list", edge_list=str(tmp_path / "nope.txt")))
    f.write_text("0 1\n1 2\n2 0\n2 3\n")  # comments and blank lines fine, K inferred as 4
    topo = build_topology(TopologyConfig(name="edge_list", edge_list=str(f)))
    assert topo.num_agents == 4 and topo.graph.number_of_edges() == 4


def test_combine_plan_is_the_agents_column():
    """Each agent sees A[:, k]: catches plans built from rows (the transposed convention)."""
    a = np.array([[0.5, 0.3, 0.0], [0.3, 0.4, 0.2], [0.2, 0.3, 0.8]])  # columns sum to 1, rows do not
    plan = combine_plan(a, 1)
    assert plan.self_weight == pytest.approx(0.4)
    assert plan.neighbors == (0, 2) and plan.neighbor_weights == pytest.approx((0.3, 0.3))
    assert combine_plan(a, 0).neighbors == (1, 2) and combine_plan(a, 0).neighbor_weights == pytest.approx((0.3, 0.2))


def test_strategy_weights():
    """centralized = 11^T/K (lambda_2 = 0), noncooperative = I (lambda_2 = 1), dif_maml = the topology's A."""
    topo = build_topology(TopologyConfig(name="paper6"))
    np.testing.assert_array_equal(strategy_weights("dif_maml", topo), topo.weights)
    assert mixing_rate(strategy_weights("centralized", topo)) == pytest.approx(0, abs=1e-12)
    assert mixing_rate(strategy_weights("noncooperative", topo)) == pytest.approx(1)


# ------------------------------------------------------------------------------ primitivity, spectrum, size


def _spectral_lambda2(a):
    """The definition itself, by the general eigensolver: rho(A.T - 11^T/K)."""
    k = a.shape[0]
    return float(max(abs(np.linalg.eigvals(a.T - np.full((k, k), 1.0 / k)))))


def _birkhoff(rng, k, terms):
    """A random doubly stochastic matrix: a convex mix of a few permutation matrices (often sparse, no diagonal)."""
    w = rng.dirichlet(np.ones(terms))
    return sum(wi * np.eye(k)[rng.permutation(k)] for wi in w)


def test_primitivity_check_agrees_with_the_spectral_definition():
    """The combinatorial test (strongly connected + aperiodic support) must say exactly what lambda_2 < 1 says:
    catches a check that misses periodicity (bipartite graph, zero diagonal), reducibility, or that wrongly
    needs self-loops (K_3 without diagonal is primitive: cycles of length 2 and 3)."""
    c4 = np.roll(np.eye(4), 1, axis=0)
    cases = {
        "paper6": (PAPER6_A, True),
        "bipartite 4-cycle, zero diagonal (period 2)": (0.5 * (c4 + c4.T), False),
        "two separate pairs (reducible)": (np.kron(np.eye(2), np.full((2, 2), 0.5)), False),
        "directed 5-cycle (period 5)": (np.roll(np.eye(5), 1, axis=0), False),
        "K_3 without self-loops": ((np.ones((3, 3)) - np.eye(3)) / 2, True),
        "lazy directed 5-cycle": (0.5 * np.eye(5) + 0.5 * np.roll(np.eye(5), 1, axis=0), True),
    }
    for name, (a, primitive) in cases.items():
        assert is_primitive(a) is primitive, name
        assert (_spectral_lambda2(a) < 1 - 1e-9) is primitive, name
    with pytest.raises(ValueError, match=r"not primitive \(lambda_2 = 1\)"):
        check_weights(cases["bipartite 4-cycle, zero diagonal (period 2)"][0], nx.cycle_graph(4))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        k = int(rng.integers(2, 7))
        a = _birkhoff(rng, k, int(rng.integers(1, 4)))
        primitive = is_primitive(a)
        seen.add(primitive)
        assert primitive is (_spectral_lambda2(a) < 1 - 1e-9), a
        g = nx.DiGraph()
        g.add_nodes_from(range(k))
        g.add_edges_from(map(tuple, np.argwhere(a > 1e-12)))
        assert primitive is (nx.is_strongly_connected(g) and nx.is_aperiodic(g)), a
    assert seen == {True, False}  # the random cases exercise both answers
    # Any nonnegative matrix (not only doubly stochastic): a one-way path must not pass as strongly connected.
    assert not is_primitive(np.array([[1.0, 1.0], [0.0, 1.0]]))  # 0 -> 1, but never back to 0
    for _ in range(300):
        k = int(rng.integers(1, 7))
        a = rng.random((k, k)) * (rng.random((k, k)) < 0.4)
        g = nx.DiGraph()
        g.add_nodes_from(range(k))
        g.add_edges_from(map(tuple, np.argwhere(a > 1e-12)))
        assert is_primitive(a) is (nx.is_strongly_connected(g) and nx.is_aperiodic(g)), a


def test_mixing_rate_symmetric_path_equals_general_eigensolver():
    """mixing_rate uses eigvalsh on symmetric A: catches a wrong shift or transposition in that fast path."""
    for seed in range(5):
        g = nx.gnp_random_graph(40, 0.15, seed=seed)
        g = g.subgraph(max(nx.connected_components(g), key=len))
        g = nx.convert_node_labels_to_integers(g)
        for rule in (metropolis_weights, max_degree_weights):
            a = rule(g)
            assert np.array_equal(a, a.T)
            assert mixing_rate(a) == pytest.approx(_spectral_lambda2(a), abs=1e-10)
    a = _birkhoff(np.random.default_rng(1), 6, 3)  # not symmetric: the general path
    assert not np.array_equal(a, a.T)
    assert mixing_rate(a) == pytest.approx(_spectral_lambda2(a), abs=1e-12)


def test_mixing_rate_above_the_cap_is_none_without_decomposing(monkeypatch):
    """Above the cap lambda_2 is not computed (None) and no eigensolver runs: catches an O(K^3) decomposition
    sneaking back for large K (the cap is lowered so the test stays small)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an eigendecomposition ran above the cap")

    monkeypatch.setattr(weights, "EXACT_SPECTRUM_MAX_AGENTS", 5)
    monkeypatch.setattr(np.linalg, "eigvals", forbidden)
    monkeypatch.setattr(np.linalg, "eigvalsh", forbidden)
    topo = build_topology(TopologyConfig(name="ring", num_agents=6))  # checks still run, combinatorially
    assert topo.lambda2 is None
    assert mixing_rate(np.eye(6)) is None
    monkeypatch.setattr(weights, "EXACT_SPECTRUM_MAX_AGENTS_NONSYMMETRIC", 4)
    assert mixing_rate(_birkhoff(np.random.default_rng(2), 5, 2)) is None  # non-symmetric: the lower cap
    monkeypatch.undo()
    assert mixing_rate(np.eye(6)) == pytest.approx(1.0)


def test_memory_refusal_before_any_dense_allocation(monkeypatch):
    """K whose K x K matrices cannot fit is refused in one line before the graph or A is built: catches the
    MemoryError traceback (50,000 agents tried to allocate 20 GB). The machine's memory is faked small."""
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 2 ** 30)

    def forbidden(*args, **kwargs):
        raise AssertionError("built the graph or weights before the size check")

    monkeypatch.setattr(topology, "build_graph", forbidden)
    with pytest.raises(ValueError) as err:
        build_topology(TopologyConfig(name="complete", num_agents=10_000))
    msg = str(err.value)
    assert msg == ("10000 agents need about 3.0 GiB (4 dense 10000x10000 float64 weight matrices of 0.7 GiB), but "
                   "this machine has 1.0 GiB of memory: use fewer agents (at most about 5792 here)")
    check_size(5792)  # the bound the message quotes fits
    with pytest.raises(ValueError, match="use fewer agents"):
        check_size(5793)
    with pytest.raises(ValueError, match="at least 1 agent"):
        check_size(0)
    monkeypatch.undo()
    real = memory.physical_memory_bytes()
    assert real is None or real > 2 ** 20


@pytest.mark.parametrize("cfg, k", [
    (TopologyConfig(name="paper6"), 6),
    (TopologyConfig(name="ring"), 6),
    (TopologyConfig(name="complete", num_agents=10 ** 9), 10 ** 9),  # arithmetic only: nothing is built
    (TopologyConfig(name="torus", rows=3, cols=4), 12),
    (TopologyConfig(name="erdos_renyi", num_agents=9), 9),
])
def test_num_agents_of_builds_nothing(cfg, k):
    """The entry point sizes the run before building: catches num_agents_of disagreeing with build_graph."""
    assert num_agents_of(cfg) == k
    if k < 100:
        assert build_topology(cfg).num_agents == k


def test_num_agents_of_edge_list(tmp_path):
    """An edge list's K is its largest id + 1 unless topology.num_agents says otherwise."""
    f = tmp_path / "g.txt"
    f.write_text("0 1\n1 2\n2 3\n")
    assert num_agents_of(TopologyConfig(name="edge_list", edge_list=str(f))) == 4
    assert num_agents_of(TopologyConfig(name="edge_list", edge_list=str(f), num_agents=7)) == 7


# ---------------------------------------------------------------------------------- messages on user files


def _one_line_error(fn):
    with pytest.raises(ValueError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    return msg


def test_directory_instead_of_file(tmp_path):
    """A folder given as a file said "does not exist": it must say it is a directory and that a file is needed."""
    msg = _one_line_error(lambda: build_topology(TopologyConfig(name="edge_list", edge_list=str(tmp_path))))
    assert msg == (f"edge list file {str(tmp_path)!r} is a directory; set topology.edge_list to a file "
                   f"(one 'u v' edge per line), not a folder")
    msg = _one_line_error(lambda: build_topology(TopologyConfig(weights="file", weight_matrix=str(tmp_path))))
    assert msg == (f"weight matrix file {str(tmp_path)!r} is a directory; set topology.weight_matrix to a file "
                   f"(K rows of K weights), not a folder")


def test_non_utf8_files_name_file_and_line(tmp_path):
    """Latin-1 bytes raised a bare UnicodeDecodeError without the file name."""
    f = tmp_path / "g.txt"
    f.write_bytes(b"0 1\n# caf\xe9\n1 2\n")
    msg = _one_line_error(lambda: build_topology(TopologyConfig(name="edge_list", edge_list=str(f))))
    assert msg == f"{f}:2: edge list file is not UTF-8 text (byte 0xe9); it must be a plain text file: save it as " \
                  f"UTF-8 (or ASCII)"
    w = tmp_path / "w.txt"
    w.write_bytes(b"\xff\xfe0.5 0.5\n")
    msg = _one_line_error(lambda: build_topology(TopologyConfig(name="ring", num_agents=2, weights="file",
                                                                weight_matrix=str(w))))
    assert msg.startswith(f"{w}:1: weight matrix file is not UTF-8 text (byte 0xff)")
    f.write_bytes(b"\xef\xbb\xbf0 1\n1 2\n")  # a UTF-8 byte-order mark is fine
    assert build_topology(TopologyConfig(name="edge_list", edge_list=str(f))).num_agents == 3


def test_weight_file_row_errors_name_the_line(tmp_path):
    """Ragged rows and non-numbers gave numpy's message; now PATH:LINE and what was expected."""
    w = tmp_path / "w.txt"
    cfg = TopologyConfig(name="ring", num_agents=3, weights="file", weight_matrix=str(w))
    w.write_text("# A for a 3-ring\n0.5, 0.25, 0.25\n0.25 0.5\n0.25 0.25 0.5\n")
    assert _one_line_error(lambda: build_topology(cfg)) == f"{w}:3: row has 2 values, expected 3 (one per agent)"
    w.write_text("0.5 0.25 0.25\n0.25 0.5 0.25\n0.25 0.25 half\n")
    assert _one_line_error(lambda: build_topology(cfg)) == \
        f"{w}:3: 'half' is not a number; the weight matrix holds numbers only"
    w.write_text("# nothing yet\n")
    assert _one_line_error(lambda: build_topology(cfg)) == \
        f"{w}: the weight matrix file holds no numbers; expected 3 rows of 3 values"
    w.write_text("0.5 0.25 0.25\n0.25 0.5 0.25\n0.25 0.25 nan\n")
    assert "non-finite weight A[2, 2] = nan" in _one_line_error(lambda: build_topology(cfg))
    w.write_text("0.5 0.25 0.25\n0.25 0.5 0.25\n0.25 0.25 0.5\n")
    np.testing.assert_array_equal(build_topology(cfg).weights, [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25],
                                                                 [0.25, 0.25, 0.5]])


def test_weight_file_with_one_way_pairs_is_refused(tmp_path):
    """Catches the one-way weight file that passed: 1/2 I + 1/2 cyclic shift on 3 agents is doubly stochastic and
    primitive, but agent 1 takes agent 0's state while agent 0 takes nothing from agent 1 (asymmetric support),
    so under torchrun agent 1 waited for a message agent 0 never sent (a timeout), the per-agent simulator
    raised KeyError and the vectorised one ran on silently. Now one line naming the file and the first pair."""
    w = tmp_path / "w.txt"
    w.write_text("0.5 0.5 0\n0 0.5 0.5\n0.5 0 0.5\n")
    cfg = TopologyConfig(name="ring", num_agents=3, weights="file", weight_matrix=str(w))
    assert _one_line_error(lambda: build_topology(cfg)) == (
        f"{w}: A[0, 1] > 0 but A[1, 0] = 0: a neighbour pair must exchange both ways (agent 1 takes agent 0's "
        f"state, agent 0 takes nothing from agent 1); make the support symmetric")
    # Larger K, no graph given: a directed 3-cycle of weight 0.1 on a Metropolis ring stays doubly stochastic;
    # the first one-way pair in row-major order is reported.
    a = metropolis_weights(nx.cycle_graph(200))
    for l, j in ((50, 120), (120, 170), (170, 50)):
        a[l, j] += 0.1
        a[l, l] -= 0.1
    with pytest.raises(ValueError, match=r"^A\[50, 120\] > 0 but A\[120, 50\] = 0: .*\(agent 120 takes agent "
                                         r"50's state, agent 50 takes nothing from agent 120\)"):
        check_weights(a)
    check_weights(0.5 * (a + a.T))  # the same entries made symmetric pass


def test_mistyped_huge_node_id_gives_a_short_message(tmp_path):
    """'2 999999' made K = 1,000,000 and a "disconnected" message listing a million components; now one short
    line saying which id sets K and which ids are missing, with no million-node graph built."""
    f = tmp_path / "g.txt"
    f.write_text("0 1\n1 2\n2 999999\n")
    msg = _one_line_error(lambda: build_topology(TopologyConfig(name="edge_list", edge_list=str(f))))
    assert msg == (f"{f}:3: node id 999999 makes K = 1000000 agents (ids 0..K-1; the largest id sets K) but only "
                   f"4 ids appear in edges (missing: 3, 4, 5, ... (999996 in all)); fix a mistyped id or renumber "
                   f"the nodes 0..K-1")
    assert len(msg) - len(str(f)) < 300
    f.write_text("0 1\n1 3\n")
    assert "(missing: 2);" in _one_line_error(lambda: num_agents_of(TopologyConfig(name="edge_list",
                                                                                   edge_list=str(f))))
    f.write_text("0 1\n-1 1\n")
    assert _one_line_error(lambda: build_topology(TopologyConfig(name="edge_list", edge_list=str(f)))) == \
        f"{f}:2: node -1 does not exist; node ids are 0..K-1"


def test_disconnected_message_is_capped(tmp_path):
    """Many components are summarised (first few, with sizes, and how many more), not listed in full."""
    f = tmp_path / "g.txt"
    f.write_text("".join(f"{i} {i + 1}\n" for i in range(9)) + "10 11\n")
    msg = _one_line_error(lambda: build_topology(TopologyConfig(name="edge_list", edge_list=str(f),
                                                                num_agents=5000)))
    assert msg == ("topology 'edge_list' is disconnected (4990 components: [0, 1, 2, 3, 4, ...] (10 agents), "
                   "[10, 11], [12] and 4987 more); agents in different components can never agree: add edges")
