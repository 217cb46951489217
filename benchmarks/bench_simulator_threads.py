"""How many threads the simulator should use: iterations/s with 1 thread and with every core, for both engines,
at K = 6, 100, 1000 agents, on an idle machine and on one saturated by a CPU hog.

Run: .venv/bin/python benchmarks/bench_simulator_threads.py [--quick] [--agents K ...] [--hogs N]

Each measurement is its own process (sinusoid, ring, Dif-MAML + Adam, meta-batch 5, training steps only, as
``bench_simulator.py``). "loaded" starts ``--hogs`` busy-looping processes (default 2 per core, a load of about
4 on top of the benchmark) for the whole row. For every row it prints the ratio of each thread count to the
best one, and what ``runtime.threads``'s default (``runtime.intra_op_threads``) picks there: the default's
worst case over all rows is the figure to keep within 1.3x of the best.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Measures one configuration in a fresh process (torch's thread pool is per process) and prints it/s as JSON.
_MEASURE = r"""
import json, sys, time, torch
from dif_maml_dist.config import Config, TopologyConfig, validate
from dif_maml_dist.simulate import Simulation
from dif_maml_dist.topology import build_topology
k, vectorize, threads, budget = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(threads)
cfg = Config()
cfg.task.meta_batch = 5
cfg.topology = TopologyConfig(name="ring", num_agents=k)
validate(cfg)
sim = Simulation(cfg, build_topology(cfg.topology).weights, device=torch.device("cpu"), vectorize=vectorize)
sim.step()
n, start = 0, time.perf_counter()
while n < 3 or time.perf_counter() - start < budget:
    sim.step()
    n += 1
print(json.dumps({"it_s": n / (time.perf_counter() - start), "n": n}))
"""


def measure(k: int, vectorize: bool, threads: int, budget: float) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(k), "1" if vectorize else "0", str(threads),
                          str(budget)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["it_s"]


def _spin() -> None:
    while True:
        pass


@contextmanager
def cpu_hog(n: int):
    """``n`` processes that burn CPU until the block ends."""
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for h in hogs:
        h.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            h.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--agents", type=int, nargs="+", default=[6, 100, 1000])
    ap.add_argument("--hogs", type=int, default=2 * len(os.sched_getaffinity(0)),
                    help="busy processes in the loaded condition (default: 2 per core)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from dif_maml_dist.config import RuntimeConfig
    from dif_maml_dist.runtime import intra_op_threads

    cores = len(os.sched_getaffinity(0))
    budget = 2.0 if args.quick else 5.0
    choices = sorted({1, cores})
    print(f"Simulator threads: sinusoid MLP, ring, Dif-MAML + Adam, meta-batch 5, {cores} core(s); loaded = "
          f"{args.hogs} busy processes beside it")
    head = " | ".join(f"{t} thr it/s" for t in choices)
    print(f"{'agents':>6} {'engine':>10} {'machine':>7} | {head} | best | default picks | default / best")
    print("-" * 96)
    worst = 1.0
    for k in args.agents:
        for vectorize in (True, False):
            if not vectorize and k > 100:
                continue  # the per-agent engine at 1000 agents takes minutes per iteration window
            default = intra_op_threads(RuntimeConfig(mode="simulate", vectorize=vectorize))
            for machine in ("idle", "loaded"):
                with cpu_hog(args.hogs if machine == "loaded" else 0):
                    rates = {t: measure(k, vectorize, t, budget) for t in choices}
                best = max(rates.values())
                ratio = best / rates[default]
                worst = max(worst, ratio)
                cells = " | ".join(f"{rates[t]:10.2f}" for t in choices)
                best_t = max(rates, key=rates.get)
                print(f"{k:6d} {'vmap' if vectorize else 'per-agent':>10} {machine:>7} | {cells} | {best_t:>4} | "
                      f"{default:>13} | {ratio:13.2f}x")
    print("-" * 96)
    print(f"default's worst case: {worst:.2f}x slower than the best thread count (goal: within 1.3x)")


if __name__ == "__main__":
    main()
