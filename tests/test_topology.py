"""Graphs, combination weights and their checks (pure, one process)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.topology import (build_topology, check_weights, combine_plan, max_degree_weights,
                                    metropolis_weights, mixing_rate, strategy_weights)

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
