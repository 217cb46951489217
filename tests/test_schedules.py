"""Time-varying graphs: every round's weights, their support, both ends' agreement, and the schedules' promises."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from dif_maml_dist.config import Config
from dif_maml_dist.gossip.rounds import combine_round
from dif_maml_dist.graphs.schedules import GraphSchedule, exponential_partner
from dif_maml_dist.graphs.topology import PAPER6_EDGES
from dif_maml_dist.graphs.weights import metropolis_weights, mixing_rate
from dif_maml_dist.run.validate import validate

GRAPHS = {"paper6": nx.Graph(PAPER6_EDGES), "ring16": nx.cycle_graph(16), "ring7": nx.cycle_graph(7)}


@pytest.mark.parametrize("name", ["static", "one_peer_exponential", "random_matching", "resample"])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_every_round_is_doubly_stochastic_on_the_allowed_edges_and_both_ends_agree(name, graph):
    """Rounds 0..23 of each schedule: non-negative, doubly stochastic, symmetric weights; off-diagonal weights only
    on base edges (one-peer exponential: on pairs at distance 2^(r mod ceil(log2 K))); every agent's plan is its
    column, so two agents on an edge use the same weight; matchings give each agent at most one peer; a lone agent
    keeps its state. Catches: a round matrix that leaks mass, an edge one end uses and the other does not (a hang
    under torchrun), a schedule that strays off the network."""
    g = GRAPHS[graph]
    k = g.number_of_nodes()
    schedule = GraphSchedule(name, g, metropolis_weights(g), seed=11, active_prob=0.5)
    for r in range(24):
        a = schedule.weights(r)
        assert (a >= 0).all() and np.allclose(a.sum(0), 1) and np.allclose(a.sum(1), 1) and np.allclose(a, a.T)
        for l, m in zip(*np.nonzero(a)):
            if l == m:
                continue
            if name == "one_peer_exponential":
                assert abs(int(l) - int(m)) == 2 ** (r % math.ceil(math.log2(k)))
            else:
                assert g.has_edge(int(l), int(m))
        peers = {}
        for agent in range(k):
            plan = schedule.plan(r, agent)
            peers[agent] = set(plan.neighbors)
            assert plan.self_weight == a[agent, agent]
            assert all(w == a[l, agent] for l, w in zip(plan.neighbors, plan.neighbor_weights))
            if not plan.neighbors:
                assert plan.self_weight == 1.0
            if name in ("one_peer_exponential", "random_matching"):
                assert len(plan.neighbors) <= 1
        assert all(agent in peers[p] for agent in range(k) for p in peers[agent])


def test_rounds_depend_on_seed_and_round_only():
    """Two agents (or two processes) that build the schedule separately get the same graphs; another seed gives
    others, and consecutive rounds differ. Catches per-process randomness (agents disagreeing on the round's edges
    would wait for messages that never come)."""
    g = GRAPHS["ring16"]
    for name in ("random_matching", "resample"):
        one, two = (GraphSchedule(name, g, metropolis_weights(g), seed=3) for _ in range(2))
        other = GraphSchedule(name, g, metropolis_weights(g), seed=4)
        assert [one.edges(r) for r in range(10)] == [two.edges(r) for r in range(10)]
        assert [one.edges(r) for r in range(10)] != [other.edges(r) for r in range(10)]
        assert len({one.edges(r) for r in range(10)}) > 5


def test_one_peer_exponential_averages_exactly_over_a_period_when_k_is_a_power_of_two():
    """With K = 2^n the pairing is the hypercube's dimension exchange: each of the n rounds averages pairs, and the
    product of one period is exactly 11^T/K (known result, e.g. BlueFog's one-peer exponential graph), so the
    period's mixing rate is 0. For K = 6 some agents sit out some rounds, but the period still mixes (rate < 1).
    Catches a pairing that is not a perfect matching, or distances that do not cycle through 1, 2, 4, ..."""
    k = 8
    schedule = GraphSchedule("one_peer_exponential", nx.cycle_graph(k), metropolis_weights(nx.cycle_graph(k)))
    product = np.eye(k)
    for r in range(3):
        assert all(exponential_partner(a, k, r) is not None for a in range(k))
        product = schedule.weights(r).T @ product
    np.testing.assert_allclose(product, np.full((k, k), 1 / k), atol=1e-15)
    assert schedule.mixing()[0] < 1e-6
    six = GraphSchedule("one_peer_exponential", GRAPHS["paper6"], metropolis_weights(GRAPHS["paper6"]))
    assert 0 < six.mixing()[0] < 1
    assert [exponential_partner(a, 6, 1) for a in range(6)] == [2, 3, 0, 1, None, None]


def test_mixing_rates_static_and_resampled():
    """The static schedule reports lambda_2 of A; resampling every edge with probability 1 is the static graph
    (so its measured rate approaches lambda_2), and dropping edges slows mixing. Catches a mixing figure that is
    not a per-round contraction (e.g. per period, or of the wrong matrix)."""
    g = GRAPHS["paper6"]
    a = metropolis_weights(g)
    assert GraphSchedule("static", g, a).mixing()[0] == pytest.approx(mixing_rate(a))
    full = GraphSchedule("resample", g, a, active_prob=1.0)
    assert all(np.array_equal(full.weights(r), a) for r in range(5))
    assert full.mixing()[0] == pytest.approx(mixing_rate(a), abs=0.02)
    assert GraphSchedule("resample", g, a, active_prob=0.3).mixing()[0] > full.mixing()[0]


def test_local_steps_combine_every_nth_iteration():
    """combine_every=3: iterations 3, 6, 9 are rounds 0, 1, 2; the others combine nothing."""
    assert [combine_round(i, 3) for i in range(1, 10)] == [None, None, 0, None, None, 1, None, None, 2]
    assert [combine_round(i, 1) for i in range(1, 4)] == [0, 1, 2]


@pytest.mark.parametrize("setting, message", [
    ({"compression.ratio": 0.0}, "compression.ratio must be in (0, 1]"),
    ({"compression.ratio": 1.5}, "compression.ratio must be in (0, 1]"),
    ({"compression.bits": 17}, "compression.bits must be in 1..16"),
    ({"compression.name": "qsgd", "compression.bits": 1}, "use compression=sign"),
    ({"compression.gamma": 0.0}, "compression.gamma must be in (0, 1]"),
    ({"compression.zeta": 1.2}, "compression.zeta must be in (0, 1]"),
    ({"topology.active_prob": 0.0}, "topology.active_prob must be in (0, 1]"),
    ({"strategy.combine_every": 0}, "strategy.combine_every must be at least 1"),
    ({"strategy.name": "centralized", "topology.schedule": "random_matching"}, "strategy=centralized uses no graph"),
    ({"strategy.name": "noncooperative", "compression.name": "topk"}, "strategy=noncooperative has none"),
    ({"topology.schedule": "hourly"}, "unknown topology.schedule 'hourly'"),
    ({"compression.name": "zip"}, "unknown compression 'zip'"),
])
def test_bad_communication_settings_are_refused(setting, message):
    """Each bad setting is a ValueError naming the key (the CLI turns it into one line before any process group).
    Catches silently accepted settings that would diverge, hang or mean nothing."""
    cfg = Config()
    for key, value in setting.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError, match=None) as err:
        validate(cfg)
    assert message in str(err.value)


def _context(tmp_path, *overrides: str):
    """The run's context as the entry point decides it (no lock, nothing written)."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.context import RunContext
    from dif_maml_dist.run.launch import compose

    cfg, _ = compose(["runtime=simulate", *overrides])
    return RunContext.build(cfg, ProcessEnv(), tmp_path / "run")


def test_start_line_reports_the_schedules_mixing_rate_the_summary_reports(tmp_path, caplog):
    """With topology.schedule=one_peer_exponential the start line's mixing rate is the schedule's per-round rate,
    the very number the summary's mixing_rate_per_round holds (computed once), not the base graph's lambda_2
    (paper6: 0.8642). Catches a start line announcing a rate the run does not have."""
    import logging

    from dif_maml_dist.run.outputs import communication, log_start

    ctx = _context(tmp_path, "topology.schedule=one_peer_exponential")
    with caplog.at_level(logging.INFO, logger="dif_maml_dist"):
        log_start(ctx)
    rate = communication(ctx.cfg, ctx.schedule)["mixing_rate_per_round"]
    assert rate == pytest.approx(0.63, abs=0.01) and ctx.schedule.mixing() is ctx.schedule.mixing()
    start = caplog.text
    assert f"one_peer_exponential mixing rate per round = {rate:.4f}" in start, start
    assert "effective lambda_2 = 0.8642" not in start
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dif_maml_dist"):
        log_start(_context(tmp_path))
    assert "effective lambda_2 = 0.8642" in caplog.text  # the static graph's rate is its lambda_2


def test_one_peer_exponential_runs_on_a_disconnected_edge_list(tmp_path):
    """The one-peer exponential schedule pairs agents by id alone and never uses the base graph's edges, so an
    edge list whose graph is disconnected only says how many agents there are: accepted, and the graph every
    round may use (its support) is connected. The static schedule on the same file is still refused. Catches a
    refusal of a run that would have mixed perfectly well."""
    f = tmp_path / "two.txt"
    f.write_text("0 1\n2 3\n")
    ctx = _context(tmp_path, "topology=edge_list", f"topology.edge_list={f}", "topology.schedule=one_peer_exponential")
    assert ctx.topology.num_agents == 4 and nx.is_connected(ctx.schedule.support())
    assert ctx.schedule.mixing()[0] < 1e-9  # K = 4, a power of two: one period averages exactly
    with pytest.raises(ValueError, match="disconnected"):
        _context(tmp_path, "topology=edge_list", f"topology.edge_list={f}")
    with pytest.raises(ValueError, match="disconnected"):
        _context(tmp_path, "topology=edge_list", f"topology.edge_list={f}", "topology.schedule=random_matching")
