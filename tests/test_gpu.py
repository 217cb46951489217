"""Checks that need a CUDA device (marked ``gpu``; ``launch/gpu_check.sh`` runs them with the rest of the GPU
checks). On a machine without CUDA each one skips and says why; everything they rely on that a CPU can check
is tested elsewhere (test_liveness.py, test_runtime.py, test_faults.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dif_maml_dist.comm.process import ProcessEnv, distributed
from dif_maml_dist.comm.transport import PeerError
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine.agent import networked_agent
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from tests.helpers import free_port, schedule_for, small_config, spawn_within

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none is visible here)")]
PAPER6 = build_topology(TopologyConfig(name="paper6"))
RING3 = build_topology(TopologyConfig(name="ring", num_agents=3))


def _states(cfg, weights, device, vectorize, iterations=10):
    sim = Simulation(cfg, weights, device=device, vectorize=vectorize)
    for _ in range(iterations):
        sim.step()
    return sim.states().detach().cpu()


@pytest.mark.parametrize("vectorize", [True, False])
def test_simulator_on_the_gpu_equals_the_cpu_simulator(vectorize):
    """``runtime=simulate runtime.device=cuda``: both engines on the GPU end where the CPU simulator ends
    (float64; summation order may differ). Catches tensors left on the CPU (task batches, the mixing matrix,
    optimizer state) and device mix-ups in the vmap over agents."""
    cfg = small_config(iterations=10)
    weights = strategy_weights("dif_maml", PAPER6)
    gpu = _states(cfg, weights, torch.device("cuda"), vectorize)
    cpu = _states(cfg, weights, torch.device("cpu"), vectorize)
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-12)


def _shared_gpu_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3",
                      LOCAL_RANK="0")  # three agents on one GPU: gloo stages their messages through the host
    cfg = small_config(iterations=10)
    cfg.runtime.device, cfg.runtime.backend, cfg.runtime.timeout_s = "cuda", "gloo", 120
    device = torch.device("cuda", 0)
    with distributed(cfg.runtime, ProcessEnv.from_environ(), device, "gloo") as transport:
        agent = networked_agent(cfg, rank, 3, schedule_for(cfg, RING3), transport, device)
        for _ in range(10):
            agent.step()
        torch.save(agent.state.params.detach().cpu(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_agents_sharing_one_gpu_over_gloo_equal_the_cpu_simulator(tmp_path):
    """Three torchrun-style processes on one GPU with ``runtime.backend=gloo`` (staged through host memory) end
    where the CPU simulator's per-agent engine ends (float64). Catches GPU tensors handed to gloo, received
    messages left on the host, and the device choice per local rank."""
    mp.spawn(_shared_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    got = torch.stack([torch.load(tmp_path / f"rank{r}.pt") for r in range(3)])
    cfg = small_config(iterations=10)
    expected = _states(cfg, strategy_weights("dif_maml", RING3), torch.device("cpu"), vectorize=False)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def _nccl_worker(rank: int, world: int, port: int, out_dir: str, hang: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = small_config(iterations=6)
    cfg.runtime.timeout_s = 10
    device = torch.device("cuda", rank)
    result: dict = {}
    try:
        with distributed(cfg.runtime, ProcessEnv.from_environ(), device, "nccl",
                         dump_dir=Path(out_dir) / "flight_recorder") as transport:
            result["backend"] = transport.backend
            peers = [p for p in range(world) if p != rank]
            got = transport.exchange({p: torch.full((5,), float(rank), device=device) for p in peers}, 0)
            result["received"] = {p: got[p].cpu() for p in got}
            result["gathered"] = transport.all_gather_object(rank)
            topo = build_topology(TopologyConfig(name="ring", num_agents=world))
            agent = networked_agent(cfg, rank, world, schedule_for(cfg, topo), transport, device)
            for _ in range(3):
                agent.step()
            result["finite"] = bool(torch.isfinite(agent.state.params).all())
            if hang and rank == 1:
                result["silent_at"] = time.time()
                torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
                time.sleep(3 * cfg.runtime.timeout_s)
                os._exit(0)  # alive but silent until then, as a hung process; then gone without teardown
            if hang:
                try:
                    for _ in range(3):
                        agent.step()
                    transport.waiter.drain()
                except PeerError as err:
                    result.update(error=str(err), peer=err.peer, at=time.time())
                    raise
    except PeerError:
        pass
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_nccl_one_rank_per_gpu_sets_up_trains_and_tears_down(tmp_path):
    """nccl with one rank per visible GPU (one GPU: one rank, which tests set-up, the collectives, the
    single-agent path and teardown): messages arrive intact, the gather works, three training steps stay
    finite, and the process group comes down without hanging."""
    world = GPUS
    mp.spawn(_nccl_worker, args=(world, free_port(), str(tmp_path), False), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for rank, res in enumerate(results):
        assert res["backend"] == "nccl" and res["gathered"] == list(range(world)) and res["finite"]
        assert all(torch.equal(t, torch.full((5,), float(p))) for p, t in res["received"].items())


@pytest.mark.skipif(GPUS < 2, reason=f"a hung nccl peer needs two GPUs (one rank each); {GPUS} visible")
def test_hung_nccl_peer_is_named_within_the_timeout(tmp_path):
    """Two nccl ranks; rank 1 goes silent mid-run. Rank 0's host-side wait (nccl's ``wait`` does not block)
    names agent 1 within runtime.timeout_s plus slack, before nccl's watchdog (at twice the timeout) would abort,
    and the flight recorder is dumped into the run directory."""
    spawn_within(_nccl_worker, (2, free_port(), str(tmp_path), True), 2, 180, "a hung nccl peer made the run hang")
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    silent = torch.load(tmp_path / "rank1.pt", weights_only=False).get("silent_at")
    assert res.get("peer") == 1 and "no message from agent 1" in res["error"], res
    assert silent is not None and res["at"] - silent <= 10 + 10
    assert any((tmp_path / "flight_recorder").glob("agent0*"))


def test_deterministic_gpu_training_repeats_and_resumes_bit_for_bit():
    """``runtime.deterministic=true`` on the GPU: the same run twice gives the same parameters bit for bit, and
    an agent restored from a mid-run state_dict continues exactly as the straight run (what resume-equality
    means on a GPU). Catches nondeterministic kernels (atomics in backward) left on under the flag, and loop
    state missing from a checkpoint on the GPU (the task stream, optimizer moments)."""
    from dif_maml_dist.comm.process import configure_process
    from dif_maml_dist.comm.transport import InMemoryTransport

    cfg = small_config("noncooperative", iterations=10)
    cfg.runtime.deterministic = True
    configure_process(cfg.runtime, threads=1)
    try:
        one = build_topology(TopologyConfig(name="ring", num_agents=1))

        def agent():
            return networked_agent(cfg, 0, 1, schedule_for(cfg, one), InMemoryTransport.network(1)[0], "cuda")

        straight, again, resumed = agent(), agent(), agent()
        for _ in range(10):
            straight.step()
            again.step()
        for _ in range(5):
            resumed.step()
        state = resumed.state_dict()
        fresh = agent()
        fresh.load_state_dict(state)
        for _ in range(5):
            fresh.step()
        assert torch.equal(straight.state.params, again.state.params)
        assert torch.equal(straight.state.params, fresh.state.params)
    finally:
        torch.use_deterministic_algorithms(False)
