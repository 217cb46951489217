"""Churn at scale, in the simulator: how the centroid's accuracy and the graph's connectivity fare as a growing
share of a large network leaves mid-run (``runtime.departures``, the same weights torchrun agents compute).

For each fraction in --fractions and each seed, that share of the K agents (drawn at random) leaves at random
iterations in the middle 80% of the run; runs

    python -m dif_maml_dist.train runtime=simulate runtime.on_peer_failure=continue topology=T \\
        topology.num_agents=K train.iterations=N 'runtime.departures=[[a,i],...]' hydra.run.dir=RUNS/.../seedS-KEY

(KEY: a hash of all the overrides, so runs made with other settings are never reused as these) and prints, per
fraction (mean over seeds): survivors, components of the surviving graph (and the largest), the
survivors' centroid test loss after one adaptation step, and its change against the network that lost nobody.

    .venv/bin/python launch/churn_study.py [--agents 100] [--topology erdos_renyi] [--edge-prob 0.05]
        [--iterations 3000] [--fractions 0 0.1 0.3 0.5] [--seeds 0 1] [--runs runs/churn] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from _runs import finished, keyed  # launch/_runs.py, beside this script

REPO = Path(__file__).resolve().parents[1]


def run(args, fraction: float, seed: int) -> dict:
    rng = random.Random(seed)
    leaving = rng.sample(range(args.agents), round(fraction * args.agents))
    lo, hi = args.iterations // 10, args.iterations - args.iterations // 10
    departures = ",".join(f"[{a},{rng.randint(lo, hi)}]" for a in sorted(leaving))
    overrides = ["runtime=simulate", "runtime.on_peer_failure=continue", f"topology={args.topology}",
                 f"topology.num_agents={args.agents}", f"seed={seed}", f"train.iterations={args.iterations}",
                 f"train.eval_every={args.iterations}", "train.log_every=500", "train.save_models=false",
                 f"runtime.departures=[{departures}]"]
    if args.topology == "erdos_renyi":
        overrides.append(f"topology.edge_prob={args.edge_prob}")
    if args.threads is not None:
        overrides.append(f"runtime.threads={args.threads}")
    run_dir = keyed(args.runs / f"K{args.agents}-{args.topology}" / f"leave{fraction:g}", f"seed{seed}", overrides)
    if not finished(run_dir):
        proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", *overrides, f"hydra.run.dir={run_dir}"],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run {run_dir} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--topology", default="erdos_renyi")
    ap.add_argument("--edge-prob", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--runs", type=Path, default=Path("runs/churn"))
    ap.add_argument("--threads", type=int, default=None, help="runtime.threads of each run (default: every core)")
    args = ap.parse_args()
    rows = {f: [run(args, f, s) for s in args.seeds] for f in args.fractions}
    base = statistics.mean(r["centroid_test_loss"] for r in rows[min(args.fractions)])
    print(f"{args.agents} agents, {args.topology}, {args.iterations} iterations, seeds {args.seeds}")
    print(f"{'leaving':>7} | {'survivors':>9} | {'components':>10} | {'largest':>7} | {'centroid loss':>13} | change")
    for f, summaries in rows.items():
        comps = [len(s["components"]) if "components" in s else 1 for s in summaries]
        largest = [len(s["components"][0]) if "components" in s else args.agents for s in summaries]
        survivors = [len(s.get("survivors", range(args.agents))) for s in summaries]
        loss = statistics.mean(s["centroid_test_loss"] for s in summaries)
        print(f"{100 * f:6.0f}% | {statistics.mean(survivors):9.1f} | {statistics.mean(comps):10.1f} | "
              f"{statistics.mean(largest):7.1f} | {loss:13.4f} | {100 * (loss / base - 1):+6.2f}%")


if __name__ == "__main__":
    main()
