"""Combine, agent state and the agent loop over the in-memory transport, against the simulator."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dif_maml_dist.comm.transport import InMemoryTransport
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine.agent import Agent, AgentState, initial_params, networked_agent
from dif_maml_dist.engine.cohorts import AgentCohort
from dif_maml_dist.engine.learner import Learner
from dif_maml_dist.gossip.combine import combine
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from dif_maml_dist.graphs.weights import combine_plan
from tests.helpers import combine_dense, in_threads, run_agent, schedule_for, simulated_states, small_config

PAPER6 = build_topology(TopologyConfig(name="paper6"))


def test_per_agent_combine_equals_dense_matrix_product():
    """Each agent's neighbour-only combine, stacked, is A^T Phi: catches using rows instead of columns of A."""
    phi = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = combine_dense(PAPER6.weights, phi)
    for k in range(6):
        plan = combine_plan(PAPER6.weights, k)
        received = {l: phi[l] for l in plan.neighbors}
        torch.testing.assert_close(combine(plan, phi[k], received), dense[k], rtol=1e-14, atol=1e-15)
    # A^T differs from A here (agent 2's column differs from its row in a non-symmetric example):
    a = np.array([[0.5, 0.3, 0.0], [0.3, 0.4, 0.2], [0.2, 0.3, 0.8]])
    torch.testing.assert_close(combine_dense(a, torch.eye(3, dtype=torch.float64)),
                               torch.as_tensor(a.T), rtol=0, atol=0)


def run_threads(cfg, weights):
    """All agents of ``weights`` as threads over one in-memory network; returns (agents, results)."""
    k = weights.shape[0]
    transports = InMemoryTransport.network(k, timeout_s=60)
    agents = [networked_agent(cfg, rank, k, schedule_for(cfg, PAPER6), transports[rank]) for rank in range(k)]
    return agents, in_threads(lambda agent: run_agent(agent, transports[agent.rank]), agents)


@pytest.mark.parametrize("strategy", ["dif_maml", "centralized", "noncooperative"])
def test_in_memory_agents_match_simulator(strategy):
    """Six agent loops talking through the in-memory transport reproduce the lock-step simulator (float64):
    bit for bit against its per-agent engine (same arithmetic, in the same order), and to 1e-10 against its
    vectorised engine (an independent implementation: vmap over agents, stacked optimizer, dense A^T Phi).

    Catches: wrong neighbour/weight routing, combining before the optimizer step, optimizer state being
    shared or reset, task streams mixed between agents, and wrong byte accounting per strategy.
    """
    iters = 12
    cfg = small_config(strategy, iterations=iters)
    weights = strategy_weights(strategy, PAPER6)
    agents, results = run_threads(cfg, weights)
    got = torch.stack([a.state.params for a in agents])
    torch.testing.assert_close(got, simulated_states(cfg, weights, iters, vectorize=True), rtol=1e-10, atol=1e-13)
    per_agent = simulated_states(cfg, weights, iters, vectorize=False)
    if strategy == "centralized":
        # The transport's all-reduce sums first and divides once; the per-agent combine adds (1/K) phi_l.
        torch.testing.assert_close(got, per_agent, rtol=1e-12, atol=1e-15)
    else:
        assert torch.equal(got, per_agent)
    if strategy != "noncooperative":  # the reference is non-trivial: agents actually mixed
        assert not torch.allclose(got, simulated_states(cfg, np.eye(6), iters), rtol=1e-6, atol=0)
    p_bytes = agents[0].layout.numel * 8
    for k in range(6):
        expected = {"dif_maml": combine_plan(PAPER6.weights, k).degree * p_bytes * iters,
                    "centralized": (2 * 5 * p_bytes // 6) * iters, "noncooperative": 0}[strategy]
        assert results[k].agents[0]["bytes_sent"] == expected
    net = results[0].network
    assert len(net["agents"]) == 6 and len(net["centroid_adaptation_curve"]) == cfg.maml.final_adapt_steps + 1
    centroid = got.mean(0)
    torch.testing.assert_close(net["centroid"], centroid, rtol=1e-12, atol=1e-15)
    assert net["disagreement"] == pytest.approx(float(((got - centroid) ** 2).sum(1).mean()), rel=1e-9)


@pytest.mark.parametrize("world", [1, 3, 8])
def test_sharded_evaluation_equals_unsharded_task_for_task(world):
    """The centroid's evaluation split over ``world`` agents (each adapting a slice of the 7 test tasks, gathered
    through the transport) equals one process adapting all of them, task for task, on every agent: catches slices
    that overlap, skip a task or come back out of order. 8 agents for 7 tasks leaves one with an empty slice."""
    cfg = small_config()
    cfg.task.eval_tasks, cfg.task.final_eval_tasks = 7, 7
    learner = Learner.build(cfg, torch.device("cpu"), torch.float64)
    params = initial_params(cfg, 0, torch.float64, torch.device("cpu"), learner.family)
    ref = learner.curves(params, 3, 0, 7)[0]
    transports = InMemoryTransport.network(world, timeout_s=60)
    got = [None] * world

    def body(rank):
        cohort = AgentCohort(Agent(cfg, rank, world, learner=learner), transports[rank])
        got[rank] = cohort.shared_curves(params, 3, final=True)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # bounded by the hub's timeout
    assert all(g is not None for g in got) and got[0][0].shape == (7, 4)
    # To rounding: a slice of one task is vmapped as a batch of one, whose kernels may round differently. Every
    # agent gets the same figures (it decides the best model from them under train.validate).
    for g in got:
        torch.testing.assert_close(g[0], ref, rtol=1e-12, atol=1e-14)
        assert torch.equal(g[0], got[0][0])
    assert (ref[1:] - ref[:-1]).abs().min() > 1e-6  # tasks differ: a swapped or repeated one would show


def test_agent_state_round_trip_resumes_identically():
    """Saving and restoring the loop state mid-run gives the same trajectory as an uninterrupted run.

    Catches state that lives outside AgentState (RNG, optimizer moments, iteration count) and a saved state
    that still aliases the live optimizer tensors.
    """
    cfg = small_config("noncooperative", iterations=8)

    def fresh():
        return networked_agent(cfg, 2, 6, schedule_for(cfg, PAPER6), None)

    straight = fresh()
    for _ in range(8):
        straight.step()
    first = fresh()
    for _ in range(5):
        first.step()
    saved = first.state.state_dict()
    for _ in range(3):  # keeps training after the save: the saved state must be a snapshot, not live references
        first.step()
    resumed = fresh()
    resumed.state.load_state_dict(saved)
    for _ in range(3):
        resumed.step()
    assert resumed.state.iteration == 8
    torch.testing.assert_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
    assert isinstance(resumed.state, AgentState)


def test_divergence_stops_every_agent_together():
    """When one agent's loss turns NaN, every agent stops with an error naming it, at the same log step.

    Catches a local-only check, which stops the diverged agent alone and leaves its neighbours waiting in the
    next exchange (here: the hub's timeout instead of FloatingPointError)."""
    def nan_loss_from_iteration_2(agent):
        if agent.rank == 5:
            adapt = agent.adapt
            agent.adapt = lambda: adapt() * (float("nan") if agent.state.iteration >= 2 else 1.0)

    errors = _run_paper6_threads(nan_loss_from_iteration_2)
    assert all(isinstance(e, FloatingPointError) for e in errors), errors
    assert all("agents [5]" in str(e) and "iteration 4" in str(e) for e in errors), errors


def _run_paper6_threads(tamper, checkpointer=None) -> list:
    """Six dif_maml agents as threads over the in-memory network (12 iterations), each after ``tamper(agent)``;
    every agent's exception (None if it finished). The hub's timeout is only what a wrong stop would run into:
    long enough that a loaded machine never reaches it on a healthy exchange."""
    cfg = small_config("dif_maml", iterations=12)
    k = 6
    transports = InMemoryTransport.network(k, timeout_s=120)
    errors = [None] * k

    def body(rank):
        agent = networked_agent(cfg, rank, k, schedule_for(cfg, PAPER6), transports[rank])
        tamper(agent)
        try:
            run_agent(agent, transports[rank], checkpointer=None if checkpointer is None else checkpointer(agent))
        except BaseException as err:
            errors[rank] = err

    threads = [threading.Thread(target=body, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # bounded by the hub's timeout
    return errors


def test_non_finite_parameters_stop_the_run_before_a_checkpoint_is_written():
    """Agent 5's parameters turn NaN after iteration 5 (its loss still finite then). With checkpoints every 2
    iterations, every agent stops at the checkpoint of iteration 6, before writing it, naming agent 5 and the
    last good checkpoint (4); no agent ever saved a non-finite state.

    Catches a divergence check that looks at the loss only, and a checkpoint written after the state went bad
    (which would make the newest checkpoint useless for a restart)."""
    k = 6
    saved = [[] for _ in range(k)]

    class Recorder:
        every, last, where = 2, None, "memory"

        def __init__(self, agent):
            self.agent = agent

        def save(self, iteration):
            saved[self.agent.rank].append((iteration, bool(torch.isfinite(self.agent.state.params).all())))
            self.last = iteration

    def nan_params_after_iteration_5(agent):
        if agent.rank == 5:
            combined = agent.set_combined

            def poisoned(w):
                combined(w)
                if agent.state.iteration == 5:
                    with torch.no_grad():
                        agent.state.params[0] = float("nan")

            agent.set_combined = poisoned

    errors = _run_paper6_threads(nan_params_after_iteration_5, checkpointer=Recorder)
    assert all(isinstance(e, FloatingPointError) for e in errors), errors
    for e in errors:
        assert "5]" in str(e) and "by iteration 6;" in str(e) and "the last good checkpoint is iteration 4" in str(e)
    assert saved == [[(2, True), (4, True)]] * k
