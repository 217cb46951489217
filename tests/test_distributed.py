"""The same agents as real gloo processes (torch.multiprocessing.spawn), against the in-process simulator.

One spawn of six processes carries every check, since process start-up dominates the cost on 2 cores.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.multiprocessing as mp

from dif_maml_dist.comm.process import ProcessEnv, distributed
from dif_maml_dist.comm.transport import TorchDistTransport
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine.agent import networked_agent
from dif_maml_dist.gossip.combine import combine
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from dif_maml_dist.graphs.weights import combine_plan
from tests.helpers import combine_dense, free_port, run_agent, schedule_for, simulated_states, small_config

STRATEGIES = ("dif_maml", "centralized", "noncooperative")
ITERS = 50
#: Every compressor and every schedule, with local steps, synchronous and overlapped, in few runs:
#: (compression, schedule, combine_every, strategy.overlap, strategy).
#: name -> the overrides of small_config's (section.field -> value) that make the variant
VARIANTS = {"topk/matching/every2": {"compression.name": "topk", "compression.ratio": 0.1,
                                     "topology.schedule": "random_matching", "strategy.combine_every": 2},
            "randk/exponential": {"compression.name": "randk", "compression.ratio": 0.2,
                                  "topology.schedule": "one_peer_exponential"},
            "qsgd/resample": {"compression.name": "qsgd", "compression.bits": 3, "topology.schedule": "resample"},
            "sign/static": {"compression.name": "sign"},
            "none/exponential/every3": {"topology.schedule": "one_peer_exponential", "strategy.combine_every": 3},
            "overlap/none/static": {"strategy.overlap": True},
            "overlap/qsgd/matching/every2": {"compression.name": "qsgd", "compression.bits": 4,
                                             "strategy.overlap": True, "topology.schedule": "random_matching",
                                             "strategy.combine_every": 2},
            "overlap/centralized": {"strategy.name": "centralized", "strategy.overlap": True},
            "staleness2/every2": {"strategy.staleness": 2, "strategy.combine_every": 2},
            "staleness3": {"strategy.staleness": 3},
            # the algorithms (maml.algorithm, MAML++'s options): learned rates in the exchanged state
            "anil": {"maml.algorithm": "anil"},
            "metasgd/qsgd": {"maml.algorithm": "metasgd", "compression.name": "qsgd", "compression.bits": 4},
            "mamlpp": {"maml.inner_steps": 2, "maml.learned_inner_lr": "per_layer_per_step",
                       "maml.multi_step_loss": True, "maml.multi_step_loss_until": 8, "maml.order_annealing_until": 3},
            "reptile": {"maml.algorithm": "reptile", "maml.inner_steps": 3}}
VARIANT_ITERS = 12


def variant_config(name: str):
    overrides = VARIANTS[name]
    cfg = small_config(overrides.get("strategy.name", "dif_maml"), iterations=VARIANT_ITERS)
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


class CountingTransport(TorchDistTransport):
    """Counts the bytes of every tensor handed to the exchange, apart from the transport's own counter."""

    def __init__(self, timeout_s: float):
        super().__init__(timeout_s)
        self.handed = 0

    def post_exchange(self, messages, round):
        self.handed += sum(m.numel() * m.element_size() for m in messages.values())
        return super().post_exchange(messages, round)
PAPER6 = build_topology(TopologyConfig(name="paper6"))


def _phi():
    return torch.randn(6, 333, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="6",
                      LOCAL_RANK=str(rank))
    cfg0 = small_config()
    cfg0.runtime.timeout_s = 60  # a routing bug must fail the test, not hang it
    out = {}
    with distributed(cfg0.runtime, ProcessEnv.from_environ(), torch.device("cpu")) as transport:
        plan = combine_plan(PAPER6.weights, rank)
        phi = _phi()
        received = transport.exchange({p: phi[rank] for p in plan.neighbors}, 0)
        out["received_from"] = sorted(received)
        out["received_ok"] = all(torch.equal(received[l], phi[l]) for l in received)
        out["combined"] = combine(plan, phi[rank], received)
        out["exchange_bytes"] = transport.bytes_sent
        for strategy in STRATEGIES:
            cfg = small_config(strategy, iterations=ITERS)
            fresh = TorchDistTransport(cfg0.runtime.timeout_s)  # its own byte counter, same process group
            agent = networked_agent(cfg, rank, 6, schedule_for(cfg, PAPER6), fresh)
            result = run_agent(agent, fresh)
            out[strategy] = {"params": agent.state.params, "bytes": result.agents[0]["bytes_sent"],
                             "network": None if result.network is None else
                             {k: result.network[k] for k in ("disagreement", "centroid")}}
        for name in VARIANTS:
            cfg = variant_config(name)
            counting = CountingTransport(cfg0.runtime.timeout_s)
            agent = networked_agent(cfg, rank, 6, schedule_for(cfg, PAPER6), counting)
            result = run_agent(agent, counting)
            out[name] = {"params": agent.state.params, "bytes": result.agents[0]["bytes_sent"],
                         "handed": counting.handed}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


_SPAWNED: list = []


def _spawned(tmp_path) -> list:
    """The six processes' outputs, from one spawn shared by the tests of this module."""
    if not _SPAWNED:
        mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=6, join=True)
        _SPAWNED.extend(torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(6))
    return _SPAWNED


def test_gloo_processes_match_simulator(tmp_path):
    """Six gloo processes: the P2P exchange routes each neighbour's state, the distributed combine equals
    A^T Phi, and 50-iteration runs of each strategy equal the simulator (float64) with exact byte counts:
    bit for bit against its per-agent engine for dif_maml and noncooperative (same arithmetic, in the same
    order; gloo moves bytes unchanged), to 1e-10 against its vectorised engine and for centralized (gloo's
    ring all-reduce adds the six states in a chunk-dependent order).

    Catches: mis-paired sends/receives, a deadlock-prone exchange (would time out), all-reduce scaling
    mistakes, and any difference between the simulator and the process runtime.
    """
    outs = _spawned(tmp_path)
    dense = combine_dense(PAPER6.weights, _phi())
    p_bytes = None
    for r, out in enumerate(outs):
        assert out["received_from"] == list(combine_plan(PAPER6.weights, r).neighbors)
        assert out["received_ok"]
        torch.testing.assert_close(out["combined"], dense[r], rtol=1e-14, atol=1e-15)
        assert out["exchange_bytes"] == combine_plan(PAPER6.weights, r).degree * 333 * 8
    for strategy in STRATEGIES:
        cfg = small_config(strategy, iterations=ITERS)
        weights = strategy_weights(strategy, PAPER6)
        got = torch.stack([o[strategy]["params"] for o in outs])
        torch.testing.assert_close(got, simulated_states(cfg, weights, ITERS), rtol=1e-10, atol=1e-13)
        per_agent = simulated_states(cfg, weights, ITERS, vectorize=False)
        if strategy == "centralized":
            torch.testing.assert_close(got, per_agent, rtol=1e-10, atol=1e-13)
        else:
            assert torch.equal(got, per_agent), strategy
        p_bytes = got.shape[1] * 8
        for r, o in enumerate(outs):
            expected = {"dif_maml": combine_plan(PAPER6.weights, r).degree * p_bytes * ITERS,
                        "centralized": (2 * 5 * p_bytes // 6) * ITERS, "noncooperative": 0}[strategy]
            assert o[strategy]["bytes"] == expected, (strategy, r)
        net = outs[0][strategy]["network"]
        centroid = got.mean(0)
        torch.testing.assert_close(net["centroid"], centroid, rtol=1e-12, atol=1e-15)
        assert np.isclose(net["disagreement"], float(((got - centroid) ** 2).sum(1).mean()), rtol=1e-9)
        assert all(o[strategy]["network"] is None for o in outs[1:])


def test_compressed_and_scheduled_gloo_runs_equal_the_per_agent_simulator(tmp_path):
    """Reads the same spawn's runs of every compressor and schedule (with local steps): the six gloo processes end
    bit for bit where the simulator's per-agent engine ends, and each agent's bytes_sent equals the bytes of the
    tensors handed to the transport (counted apart from the code's counter), the simulator's count, and — for the
    scaled sign on the static graph — what its format implies: degree x (8-byte scale + ceil(P/8) bytes) per
    iteration. Catches: payloads that differ between processes and the simulator (other random draws, other copies),
    agents disagreeing on a round's graph (a hang: the timeout fails the test), a byte counter that counts the
    uncompressed state, and local steps that still exchange. The overlapped runs (strategy.overlap) end where the
    simulator's overlapped recursion ends: catches a posted state changed before its messages left, or a step
    applied before the combination instead of after it. The stale runs (strategy.staleness, several rounds in
    flight on every edge) end where the simulator's delay lines end: catches rounds matched out of order on a
    pair, a sent state changed while it waits to be received, or a round's messages used at the wrong delay. The
    algorithms' runs (ANIL, Meta-SGD with compression, MAML++'s options together, Reptile) end where the simulator's
    both engines end (the per-agent one's loop path bit for bit, the vectorised one's vmap path to 1e-10): catches
    learned rates left out of the exchanged state or the byte count, and an annealing schedule read at another
    iteration in the processes than in the simulator.
    """
    outs = _spawned(tmp_path)
    for name in VARIANTS:
        cfg = variant_config(name)
        expected, sim_bytes = simulated_states(cfg, schedule_for(cfg, PAPER6), VARIANT_ITERS, vectorize=False,
                                               with_bytes=True)
        got = torch.stack([o[name]["params"] for o in outs])
        if cfg.strategy.name == "centralized":  # gloo's ring all-reduce sums in its own order
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
            continue
        assert torch.equal(got, expected), name
        assert [o[name]["bytes"] for o in outs] == [o[name]["handed"] for o in outs] == sim_bytes, name
        vectorized = simulated_states(cfg, schedule_for(cfg, PAPER6), VARIANT_ITERS)
        torch.testing.assert_close(got, vectorized, rtol=1e-10, atol=1e-12)
    sign_bytes = 8 + -(-outs[0]["sign/static"]["params"].numel() // 8)
    assert [o["sign/static"]["bytes"] for o in outs] == [combine_plan(PAPER6.weights, r).degree * sign_bytes * VARIANT_ITERS
                                                         for r in range(6)]
