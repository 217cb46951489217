"""Bounded staleness (strategy.staleness): the simulator's both engines against the delayed recursion written out,
with local steps, the default step against delayed consensus's stability bound, and across checkpoints (simulator
and networked agents)."""

from __future__ import annotations

import io

import pytest
import torch

from dif_maml_dist.comm.transport import InMemoryTransport
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine.agent import networked_agent
from dif_maml_dist.gossip.stale import STEP_MARGIN, stale_step
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from tests.helpers import (
    in_threads,
    reference_sgd_run,
    resumed_simulation_states,
    schedule_for,
    simulated_states,
    small_config,
)

PAPER6 = build_topology(TopologyConfig(name="paper6"))
ITERS = 7


def _stale_reference(cfg, weights, iterations: int, staleness: int, step: float):
    """``phi_{k,i} = w_{k,i-1} - lr * g_k(w_{k,i-1})``, then ``w_{k,i} = phi_{k,i} + step * sum_l a_lk
    (phi_{l,i-s} - phi_{k,i-s})`` with ``phi_{l,j} = w_{l,0}`` for ``j <= 0``, with plain SGD
    (``helpers.reference_sgd_run``)."""
    a = torch.as_tensor(weights, dtype=torch.float64)
    phis = []  # phi_1, phi_2, ...

    def update(w, g, i):
        if not phis:
            phis.extend([w] * staleness)  # phi_{1-s}, ..., phi_0: the initial models
        phi = w - cfg.optim.lr * g
        then = phis[-staleness]
        phis.append(phi)
        return phi + step * (a.T @ then - then)

    return reference_sgd_run(cfg, weights, iterations, update)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("staleness", [1, 3])
def test_stale_simulation_follows_the_delayed_recursion(vectorize, staleness):
    """Both simulator engines with strategy.staleness=s equal w_{k,i} = phi_{k,i} + gamma sum_l a_lk (phi_{l,i-s}
    - phi_{k,i-s}) written out with a reference meta-gradient (SGD, float64, the paper's graph; the initial models
    before round 0; gamma the default step), and differ from the synchronous run. Catches: the setting ignored, a
    delay off by one, the fresh state delayed too, the first rounds corrected by something other than the initial
    models, or a stored state that changed while it waited in the line."""
    cfg = small_config(iterations=ITERS, optim="sgd")
    cfg.optim.lr = 0.05  # large enough that which state is combined shows well above rounding
    cfg.strategy.staleness = staleness
    weights = strategy_weights("dif_maml", PAPER6)
    got = simulated_states(cfg, weights, ITERS, vectorize=vectorize)
    step = stale_step(weights, staleness)
    assert 0.1 < step < 1
    torch.testing.assert_close(got, _stale_reference(cfg, weights, ITERS, staleness, step), rtol=1e-10, atol=1e-12)
    cfg.strategy.staleness = 0
    synchronous = simulated_states(cfg, weights, ITERS, vectorize=vectorize)
    assert (got - synchronous).abs().max() > 1e-6


def test_stale_engines_agree_with_local_steps():
    """With combine_every=2 (staleness counts combination rounds, not iterations) and Adam, the vectorised engine
    equals the per-agent one (the torchrun code path; up to the meta-gradients' summation order), and a delay of 2
    rounds differs from a delay of 1. Catches a line advanced at local steps, or engines that disagree on which round a message belongs to."""
    cfg = small_config(iterations=8)
    cfg.strategy.combine_every, cfg.strategy.staleness = 2, 2
    weights = strategy_weights("dif_maml", PAPER6)
    vec, per = (simulated_states(cfg, weights, 8, vectorize=v) for v in (True, False))
    torch.testing.assert_close(vec, per, rtol=1e-10, atol=1e-12)
    cfg.strategy.staleness = 1
    assert (per - simulated_states(cfg, weights, 8, vectorize=False)).abs().max() > 1e-8


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_stale_run_continues_from_its_checkpoint_bit_for_bit(vectorize):
    """A stale simulation (s=2) stopped after 3 iterations and continued from its state_dict in a new Simulation
    ends where an uninterrupted one ends. Catches a checkpoint that drops the states waiting in the delay lines
    (the continued run would combine with the initial models again)."""
    cfg = small_config(iterations=ITERS)
    cfg.strategy.staleness = 2
    whole, resumed = resumed_simulation_states(cfg, strategy_weights("dif_maml", PAPER6), 3, ITERS, vectorize)
    assert torch.equal(whole, resumed)


def _delayed_consensus_spread(weights, staleness: int, step: float, rounds: int) -> float:
    """How far from their average the agents are after ``rounds`` rounds of the stale combine alone (no learning):
    ``w_i = w_{i-1} + step (A^T w_{i-1-s} - w_{i-1-s})`` from a fixed random start, relative to the start's spread.
    Checks on the way that the average stays where it started."""
    a = torch.as_tensor(weights, dtype=torch.float64)
    start = torch.randn(weights.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    history = [start] * (staleness + 1)
    for _ in range(rounds):
        then = history[-1 - staleness]
        history.append(history[-1] + step * (a.T @ then - then))
    w = history[-1]
    torch.testing.assert_close(w.mean(0), start.mean(0), rtol=0, atol=1e-9 * max(1.0, float(w.abs().max())))
    return float((w - w.mean(0)).norm() / (start - start.mean(0)).norm())


@pytest.mark.parametrize("staleness", [1, 2, 4, 8])
def test_the_default_stale_step_is_where_delayed_consensus_is_stable(staleness):
    """The default step (0.9 of 2 cos(s pi/(2s+1)) / (1 - lambda_min)) shrinks the agents' spread, and 1.1 times
    the bound makes it grow, on the paper's graph, for delays 1 to 8; the network average never moves. Catches a
    wrong stability bound (a default that diverges, or one far inside the region, which mixes needlessly slowly)
    and a correction that does not sum to zero over the network."""
    weights = strategy_weights("dif_maml", PAPER6)
    step = stale_step(weights, staleness)
    assert _delayed_consensus_spread(weights, staleness, step, 3000) < 1e-3
    assert _delayed_consensus_spread(weights, staleness, step / STEP_MARGIN * 1.1, 3000) > 1e3
    assert stale_step(weights, staleness, 0.05) == 0.05  # a configured step is taken as it is


def _threaded_steps(agents, iterations: int, then=None) -> list:
    """``iterations`` steps of every agent, one thread each; then ``then(agent)`` in the same thread; its results
    by rank."""
    def steps(agent):
        for _ in range(iterations):
            agent.step()
        return then(agent) if then else None

    return in_threads(steps, agents)


def _networked(cfg) -> list:
    transports = InMemoryTransport.network(6, timeout_s=120)
    return [networked_agent(cfg, r, 6, schedule_for(cfg, PAPER6), transports[r]) for r in range(6)]


def test_networked_stale_agents_continue_from_their_checkpoints_bit_for_bit():
    """Six networked agents (the torchrun code: combiners over a transport, here the in-memory one) with s=2: a run
    interrupted after 3 iterations, its agents' states saved as a checkpoint is (torch.save, loaded on the CPU),
    continued by new agents on a new network, ends where an uninterrupted run and the per-agent simulator end.
    Catches a combiner checkpoint without the rounds still in flight, or one that saved them before they arrived."""
    cfg = small_config(iterations=ITERS)
    cfg.strategy.staleness = 2
    whole = _networked(cfg)
    _threaded_steps(whole, ITERS)
    expected = torch.stack([a.state.params for a in whole])
    assert torch.equal(expected, simulated_states(cfg, strategy_weights("dif_maml", PAPER6), ITERS, vectorize=False))

    def saved(agent):
        buffer = io.BytesIO()
        torch.save(agent.state_dict(), buffer)
        return buffer.getvalue()

    checkpoints = _threaded_steps(_networked(cfg), 3, then=saved)
    resumed = _networked(cfg)
    for agent, data in zip(resumed, checkpoints):
        agent.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    _threaded_steps(resumed, ITERS - 3)
    assert torch.equal(torch.stack([a.state.params for a in resumed]), expected)
