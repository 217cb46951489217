"""The overlapped combine (strategy.overlap): the simulator's both engines against the recursion written out."""

from __future__ import annotations

import pytest
import torch

from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from tests.helpers import reference_sgd_run, resumed_simulation_states, schedule_for, simulated_states, small_config

PAPER6 = build_topology(TopologyConfig(name="paper6"))
ITERS = 6


def _overlap_reference(cfg, weights, iterations: int):
    """``w_{k,i} = sum_l a_lk w_{l,i-1} - lr * g_k(w_{k,i-1})`` with plain SGD (``helpers.reference_sgd_run``)."""
    a = torch.as_tensor(weights, dtype=torch.float64)
    return reference_sgd_run(cfg, weights, iterations, lambda w, g, i: a.T @ w - cfg.optim.lr * g)


@pytest.mark.parametrize("vectorize", [True, False])
def test_overlapped_simulation_follows_the_adapt_while_combine_recursion(vectorize):
    """Both simulator engines with strategy.overlap=true equal the recursion w_i = A^T w_{i-1} - mu g(w_{i-1})
    written out with a reference meta-gradient (SGD, float64, the paper's graph), and differ from the synchronous
    (adapt-then-combine) run. Catches: the flag ignored, the step taken before the combination (ATC again), the
    meta-gradient taken at the combined state instead of the previous one, or an agent's step added to another."""
    cfg = small_config(iterations=ITERS, optim="sgd")
    cfg.optim.lr = 0.05  # large enough that the order of the steps shows well above rounding
    cfg.strategy.overlap = True
    weights = strategy_weights("dif_maml", PAPER6)
    got = simulated_states(cfg, weights, ITERS, vectorize=vectorize)
    torch.testing.assert_close(got, _overlap_reference(cfg, weights, ITERS), rtol=1e-10, atol=1e-12)
    cfg.strategy.overlap = False
    synchronous = simulated_states(cfg, weights, ITERS, vectorize=vectorize)
    assert (got - synchronous).abs().max() > 1e-6


@pytest.mark.parametrize("strategy, compression, schedule, every", [
    ("dif_maml", "qsgd", "one_peer_exponential", 2),
    ("dif_maml", "topk", "random_matching", 1),
    ("centralized", "none", "static", 1),
    ("noncooperative", "none", "static", 1)])
def test_overlapped_engines_agree_with_compression_schedules_and_local_steps(strategy, compression, schedule,
                                                                               every):
    """The vectorised engine (one stacked Adam step after the stacked combine) equals the per-agent engine
    (Agent.finish_overlapped, the torchrun code) with compressed gossip, changing graphs, local steps, the
    centralized mean and no exchange at all (float64, Adam). Non-cooperative agents have nothing to overlap: their
    run is the synchronous one, bit for bit. Catches the engines applying the optimizer step at different points
    of the round, or compressed copies updated from the wrong state."""
    cfg = small_config(strategy, iterations=ITERS)
    cfg.compression.name, cfg.topology.schedule, cfg.strategy.combine_every = compression, schedule, every
    cfg.strategy.overlap = True
    sched = schedule_for(cfg, PAPER6)
    vec, per = (simulated_states(cfg, sched, ITERS, vectorize=v) for v in (True, False))
    torch.testing.assert_close(vec, per, rtol=1e-10, atol=1e-12)
    cfg.strategy.overlap = False
    synchronous = simulated_states(cfg, sched, ITERS, vectorize=False)
    if strategy == "noncooperative":
        assert torch.equal(per, synchronous)
    else:
        assert (per - synchronous).abs().max() > 1e-8


def test_an_overlapped_run_continues_from_its_checkpoint_bit_for_bit():
    """An overlapped simulation stopped after 3 iterations and continued from its state_dict (in a new
    Simulation) ends where an uninterrupted one ends: the overlap keeps nothing across iterations that a
    checkpoint would miss. Catches a posted round or pending step carried over an iteration boundary."""
    cfg = small_config(iterations=ITERS)
    cfg.strategy.overlap = True
    whole, resumed = resumed_simulation_states(cfg, strategy_weights("dif_maml", PAPER6), 3, ITERS)
    assert torch.equal(whole, resumed)
