"""Simulator throughput for large networks: iterations/s at K = 6, 100, 1000 agents (sinusoid, meta-batch 5).

Run: .venv/bin/python benchmarks/bench_simulator.py [--quick] [--threads N] [--device cpu|cuda] [--agents K ...]

Each K is a ring (sparse: the combine is a sparse matrix product) with Dif-MAML and Adam; the vectorised
engine (one vmap over agents) is compared side by side with the per-agent engine (the runtime's own code,
agent by agent) where the latter is affordable. Only training steps are timed (no evaluation).
"""

from __future__ import annotations

import argparse
import time

import torch

from dif_maml_dist.config import Config, TopologyConfig
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.topology import build_topology
from dif_maml_dist.run.validate import validate


def iterations_per_second(k: int, vectorize: bool, meta_batch: int, budget_s: float,
                          device: torch.device = torch.device("cpu")) -> tuple[float, int]:
    cfg = Config()
    cfg.task.meta_batch = meta_batch
    cfg.topology = TopologyConfig(name="ring", num_agents=k)
    validate(cfg)
    sim = Simulation(cfg, build_topology(cfg.topology).weights, device=device, vectorize=vectorize)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sim.step()  # warm-up (first vmap trace, allocator)
    sync()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < budget_s:
        sim.step()
        n += 1
    sync()
    return n / (time.perf_counter() - start), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default: 1, as the simulator uses by default; the vectorised "
                         "engine's chunks of agents go to every core, runtime.chunk_threads)")
    ap.add_argument("--meta-batch", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (runtime=simulate runtime.device=...)")
    ap.add_argument("--agents", type=int, nargs="+", default=[6, 100, 1000])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = 2.0 if args.quick else 8.0
    print(f"Simulator throughput: sinusoid MLP (1761 parameters), ring topology, Dif-MAML + Adam, meta-batch "
          f"{args.meta_batch}, second order, float32, {args.threads} thread(s), {device}, torch {torch.__version__}")
    print(f"{'agents':>7} | {'vectorized it/s':>15} {'tasks/s':>9} | {'per-agent it/s':>14} | {'speed-up':>8}")
    print("-" * 66)
    for k in args.agents:
        vec, _ = iterations_per_second(k, True, args.meta_batch, budget, device)
        if k <= 100:
            per, _ = iterations_per_second(k, False, args.meta_batch, budget, device)
            per_s, ratio = f"{per:14.2f}", f"{vec / per:7.1f}x"
        else:
            per_s, ratio = f"{'(skipped)':>14}", f"{'':>8}"
        print(f"{k:7d} | {vec:15.2f} {vec * k * args.meta_batch:9.0f} | {per_s} | {ratio}")
    print("-" * 66)
    print("it/s = lock-step iterations of the whole network per second (training steps only, no evaluation);\n"
          "tasks/s = it/s x agents x meta-batch; per-agent = the runtime's Agent code, one agent after another.")


if __name__ == "__main__":
    main()
