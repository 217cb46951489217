"""The in-process simulator: its two engines agree, and the per-agent engine is the runtime's own arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine import simulator as simulate
from dif_maml_dist.engine.figures import figures
from dif_maml_dist.engine.loop import ListSink, run_loop
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from tests.helpers import figures_of, small_config

PAPER6 = build_topology(TopologyConfig(name="paper6"))


@pytest.mark.parametrize("strategy", ["dif_maml", "centralized", "noncooperative"])
@pytest.mark.parametrize("meta_batch, optim", [(2, "adam"), (5, "sgd")])
def test_vectorized_engine_equals_per_agent_engine(strategy, meta_batch, optim):
    """vmap-over-agents + one stacked optimizer + A^T Phi equals K separate agents combining neighbour by
    neighbour (float64). Two independent implementations of the same algorithm: catches a wrong transpose,
    agents' task streams or optimizer states mixed up in the stack, or a wrong vmap over agents. meta_batch=5
    also takes the agents' vmap meta-gradient path. Agents are vmapped in chunks of 4 (6 = 4 + 2) to cover the
    chunking."""
    cfg = small_config(strategy, iterations=15, optim=optim)
    cfg.runtime.agent_chunk = 4
    cfg.task.meta_batch = meta_batch
    weights = strategy_weights(strategy, PAPER6)
    vec, per = Simulation(cfg, weights, vectorize=True), Simulation(cfg, weights, vectorize=False)
    for _ in range(15):
        lv, lp = vec.step(), per.step()
    torch.testing.assert_close(torch.stack(list(lv)), torch.stack(list(lp)), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(vec.states(), per.states(), rtol=1e-10, atol=1e-13)
    if strategy != "centralized":  # where every agent holds the mean, rows may or may not round alike
        assert not torch.equal(vec.states()[0], vec.states()[5])  # agents hold different models


def test_vectorized_evaluation_equals_per_agent_evaluation(monkeypatch):
    """Every agent's test figures from one vmap over agents (in chunks of 4: 6 = 4 + 2) equal each agent
    evaluated alone (float64), also when agents share a model (evaluated once): catches agents' figures swapped,
    a chunk dropped, agents mixed in the vmap, or shared models mapped back to the wrong agents."""
    monkeypatch.setattr(simulate, "_EVAL_AGENT_CHUNK", 4)
    cfg = small_config("noncooperative", iterations=3)
    sim = Simulation(cfg, strategy_weights("noncooperative", PAPER6), vectorize=True)
    for _ in range(3):
        sim.step()
    together = [figures(c) for c in sim.agent_curves(3, final=True)]
    assert len(together) == 6
    for k in range(6):
        alone = figures_of(sim.learner, sim.states()[k].detach(), 3, final=True)
        np.testing.assert_allclose(together[k]["loss"], alone["loss"], rtol=1e-12)
    assert together[0]["loss"] != together[5]["loss"]  # the agents' models differ
    with torch.no_grad():  # agents 1 and 4 hold agent 3's model (evaluated once): each still gets its figures
        sim.params[1] = sim.params[3]
        sim.params[4] = sim.params[3]
    shared = [figures(c) for c in sim.agent_curves(3, final=True)]
    assert shared[1] == shared[3] == shared[4]
    for k in (0, 3, 5):
        np.testing.assert_allclose(shared[k]["loss"], together[k]["loss"], rtol=1e-12)


def test_sparse_and_dense_combine_agree():
    """A 40-agent ring uses the sparse product; it must equal the dense one."""
    cfg = small_config("dif_maml", iterations=3)
    topo = build_topology(TopologyConfig(name="ring", num_agents=40))
    sparse = Simulation(cfg, topo.weights)
    assert sparse._mixer(0).layout == torch.sparse_csr
    phi = torch.randn(40, sparse.layout.numel, dtype=torch.float64)
    dense = torch.as_tensor(topo.weights.T) @ phi
    torch.testing.assert_close(sparse._mixer(0) @ phi, dense, rtol=1e-13, atol=1e-14)


def test_simulation_runs_the_shared_schedule():
    """Through run_loop the simulator writes the runtime's records: one stream per agent, network records at
    0, every eval_every and the end, and final figures for every agent. The end's record, taken from the final
    evaluation (more tasks, more steps), equals a fresh periodic evaluation: catches a wrong slice of tasks or
    steps."""
    cfg = small_config("dif_maml", iterations=8)
    cfg.task.final_eval_tasks = 30  # the periodic set (20) is a prefix of a longer final one
    sim = Simulation(cfg, PAPER6.weights)
    sinks, net = [ListSink() for _ in range(6)], ListSink()
    result = run_loop(sim, sinks, net)
    assert [r["iteration"] for r in sinks[3].records] == [0, 4, 8]
    assert [r["iteration"] for r in net.records] == [0, 4, 8]
    assert [a["agent"] for a in result.network["agents"]] == list(range(6))
    assert result.network["agents"][2]["bytes_sent"] == 4 * sim.layout.numel * 8 * 8  # degree 4, float64, 8 its
    # The last periodic record is read off the final evaluation: it must equal a fresh periodic evaluation.
    fresh = figures(sim.shared_curves(sim.states().mean(0), cfg.maml.eval_inner_steps))
    assert net.records[-1]["centroid_test_loss_post"] == pytest.approx(fresh["loss"][-1], rel=1e-12)
    assert net.records[-1]["centroid_test_loss_pre"] == pytest.approx(fresh["loss"][0], rel=1e-12)
    agent3 = figures(sim.agent_curves(cfg.maml.eval_inner_steps)[3])
    assert sinks[3].records[-1]["test_loss_post"] == pytest.approx(agent3["loss"][-1], rel=1e-12)
    assert sim.learner.num_tests(final=True) > cfg.task.eval_tasks and cfg.maml.final_adapt_steps > 1


def test_saved_agent_model_holds_that_agent_only(tmp_path):
    """A simulator agent's parameters are views into one [agents, P] tensor; its model file must hold its own
    P numbers, not the whole stack (torch.save writes a view's storage: 1000 agents once made 1000 files of 7 MB)."""
    from dif_maml_dist.run.files import save_tensors_atomic

    cfg = small_config("dif_maml", iterations=1)
    sim = Simulation(cfg, build_topology(TopologyConfig(name="ring", num_agents=40)).weights)
    path = tmp_path / "agent7.pt"
    save_tensors_atomic(path, sim.named_params(sim.states()[7]))
    own_bytes = sim.layout.numel * 8
    assert path.stat().st_size < 2 * own_bytes + 10_000  # one model plus the pickle's overhead
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(torch.cat([loaded[n].reshape(-1) for n in sim.layout.names]), sim.states()[7].detach())


def test_chunk_threads_leave_the_result_unchanged():
    """The vectorised engine computes its chunks of agents on several threads (runtime.chunk_threads): 40 agents in
    two chunks on two threads end bit for bit where one thread ends. Catches chunks put back out of order or
    mixed up between threads, and a default chunk size that left a 40-agent network in one chunk."""
    cfg = small_config(iterations=3)
    cfg.topology = TopologyConfig(name="ring", num_agents=40)
    weights = build_topology(cfg.topology).weights
    states = {}
    for threads in (1, 2):
        cfg.runtime.chunk_threads = threads
        sim = Simulation(cfg, weights)
        assert sim.agent_chunk == 32 and (sim._chunk_pool is None) == (threads == 1)
        for _ in range(3):
            sim.step()
        states[threads] = sim.states().detach().clone()
    assert torch.equal(states[1], states[2])
