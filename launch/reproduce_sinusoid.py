"""Reproduce the paper's sinusoid results (Dif-MAML §4.1, appendix D.1/D.4) with the in-process simulator.

For each optimizer (Adam mu = 0.001, SGD mu = 0.005), strategy (dif_maml, centralized, noncooperative) and seed,
train 6 agents on the paper6 graph for the paper's schedule, then write

- ``sinusoid_loss_vs_iteration.csv`` / ``.png``: mean test loss of the agents after one adaptation step, every
  ``eval_every`` iterations (paper Fig. 2b / 6a), mean over seeds with the min-max band;
- ``sinusoid_loss_vs_steps.csv`` / ``.png``: after training, test loss vs number of adaptation steps 0..10
  (paper Fig. 2c / 6b);
- ``sinusoid_final.csv``: the final figures per run.

Run: .venv/bin/python launch/reproduce_sinusoid.py --out docs/figures [--seeds 0 1 2] [--iterations 24000] [--jobs 2]
(figures need matplotlib: pip install -e '.[plots]'). The simulator equals the torchrun runtime (tests/test_distributed.py).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

STRATEGIES = ("dif_maml", "centralized", "noncooperative")
LR = {"adam": 0.001, "sgd": 0.005}
COLORS = {"dif_maml": "tab:blue", "centralized": "tab:green", "noncooperative": "tab:red"}


def one_run(job: tuple[str, str, int, int, int]) -> dict:
    """Train one configuration in this process; returns its curves."""
    optim, strategy, seed, iterations, eval_every = job
    import torch

    from dif_maml_dist.config import Config
    from dif_maml_dist.engine.loop import ListSink, run_loop
    from dif_maml_dist.engine.simulator import Simulation
    from dif_maml_dist.graphs.topology import build_topology, strategy_weights
    from dif_maml_dist.run.validate import validate

    torch.set_num_threads(1)
    cfg = Config(seed=seed)
    cfg.strategy.name, cfg.optim.name, cfg.optim.lr = strategy, optim, LR[optim]
    cfg.train.iterations, cfg.train.eval_every, cfg.train.log_every = iterations, eval_every, eval_every
    validate(cfg)
    sim = Simulation(cfg, strategy_weights(strategy, build_topology(cfg.topology)))
    sinks = [ListSink() for _ in range(sim.num_agents)]
    start = time.perf_counter()
    out = {"optim": optim, "strategy": strategy, "seed": seed, "diverged": None}
    try:
        net = run_loop(sim, sinks).network
    except FloatingPointError as err:  # a diverged run is a result too: keep its curve up to the divergence
        out["diverged"] = str(err)
        net = None
    evals = [r for r in sinks[0].records if "test_loss_post" in r]
    post = np.array([[r["test_loss_post"] for r in s.records if "test_loss_post" in r][:len(evals)] for s in sinks])
    nan_curve = [float("nan")] * (cfg.maml.final_adapt_steps + 1)
    out.update({
        "iterations": [r["iteration"] for r in evals], "test_loss": post.mean(0).tolist(),
        "steps_curve": (np.array([a["adaptation_curve"] for a in net["agents"]]).mean(0).tolist() if net
                        else nan_curve),
        "final_test_loss": float(np.mean([a["final_test_loss"] for a in net["agents"]])) if net else float("nan"),
        "centroid_test_loss": net["centroid_test_loss"] if net else float("nan"),
        "disagreement": net["disagreement"] if net else float("nan"),
        "seconds": time.perf_counter() - start})
    return out


def write_csvs(runs: list[dict], out: Path) -> None:
    with (out / "sinusoid_loss_vs_iteration.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optim", "strategy", "seed", "iteration", "mean_agent_test_loss_after_1_step"])
        for r in runs:
            for it, loss in zip(r["iterations"], r["test_loss"]):
                w.writerow([r["optim"], r["strategy"], r["seed"], it, f"{loss:.6f}"])
    with (out / "sinusoid_loss_vs_steps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optim", "strategy", "seed", "adaptation_steps", "mean_agent_test_loss"])
        for r in runs:
            for s, loss in enumerate(r["steps_curve"]):
                w.writerow([r["optim"], r["strategy"], r["seed"], s, f"{loss:.6f}"])
    with (out / "sinusoid_final.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optim", "strategy", "seed", "mean_agent_test_loss_after_1_step", "centroid_test_loss_after_1_step",
                    "disagreement", "seconds", "diverged"])
        for r in runs:
            w.writerow([r["optim"], r["strategy"], r["seed"], f"{r['final_test_loss']:.6f}",
                        f"{r['centroid_test_loss']:.6f}", f"{r['disagreement']:.3e}", f"{r['seconds']:.1f}",
                        r["diverged"] or ""])


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optims = sorted({r["optim"] for r in runs})
    for key, xlabel, name in (("test_loss", "iteration", "sinusoid_loss_vs_iteration.png"),
                              ("steps_curve", "adaptation steps", "sinusoid_loss_vs_steps.png")):
        fig, axes = plt.subplots(1, len(optims), figsize=(5.5 * len(optims), 4), squeeze=False)
        for ax, optim in zip(axes[0], optims):
            for strategy in STRATEGIES:
                every = [r for r in runs if r["optim"] == optim and r["strategy"] == strategy]
                sel = [r for r in every if not r["diverged"]]
                lost = [r for r in every if r["diverged"]]
                for r in lost if key == "test_loss" else []:  # up to the divergence, thin and dashed
                    ax.plot(r["iterations"], r["test_loss"], "--", color=COLORS[strategy], linewidth=0.8)
                if not sel:
                    continue
                y = np.array([r[key] for r in sel])
                x = sel[0]["iterations"] if key == "test_loss" else list(range(y.shape[1]))
                extra = f", {len(lost)} diverged (dashed)" if lost else ""
                ax.plot(x, y.mean(0), color=COLORS[strategy], label=f"{strategy} ({len(sel)} seeds{extra})")
                ax.fill_between(x, y.min(0), y.max(0), color=COLORS[strategy], alpha=0.2, linewidth=0)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test MSE (mean over 6 agents)" + (", 1 step" if key == "test_loss" else ""))
            ax.set_title(f"sinusoid, 6 agents, {optim} (mu = {LR[optim]})")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="Reproduce the Dif-MAML sinusoid figures with the simulator.")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optims", nargs="+", default=["adam", "sgd"], choices=sorted(LR))
    ap.add_argument("--iterations", type=int, default=24000)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(o, s, seed, args.iterations, args.eval_every)
            for o, s, seed in itertools.product(args.optims, STRATEGIES, args.seeds)]
    # Each finished run is kept as JSON, so an interrupted reproduction resumes where it stopped.
    cache = args.out / "runs"
    cache.mkdir(exist_ok=True)

    def cached(job) -> Path:
        return cache / f"{job[0]}_{job[1]}_seed{job[2]}_{job[3]}it.json"

    todo = [j for j in jobs if not cached(j).is_file()]
    print(f"{len(jobs)} runs of {args.iterations} iterations ({len(jobs) - len(todo)} cached), "
          f"{args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for job, r in zip(todo, pool.map(one_run, todo)):
            cached(job).write_text(json.dumps(r))
            print(f"  {r['optim']:4s} {r['strategy']:14s} seed {r['seed']}: agents {r['final_test_loss']:.4f}, "
                  f"centroid {r['centroid_test_loss']:.4f}, disagreement {r['disagreement']:.2e} "
                  f"({r['seconds']:.0f} s){'  DIVERGED: ' + r['diverged'] if r['diverged'] else ''}", flush=True)
    runs = [json.loads(cached(j).read_text()) for j in jobs]
    write_csvs(runs, args.out)
    print("\nfinal mean test loss after one adaptation step (mean ± std over the seeds that did not diverge):")
    for optim in args.optims:
        for strategy in STRATEGIES:
            sel = [r for r in runs if r["optim"] == optim and r["strategy"] == strategy]
            v = np.array([r["final_test_loss"] for r in sel if not r["diverged"]])
            diverged = [r["seed"] for r in sel if r["diverged"]]
            stat = f"{v.mean():.4f} ± {v.std():.4f}" if len(v) else "n/a"
            print(f"  {optim:4s} {strategy:14s} {stat}" + (f"  (diverged: seeds {diverged})" if diverged else ""))
    try:
        plot(runs, args.out)
        print(f"figures and CSVs in {args.out}")
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[plots]'): CSVs only, in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
