"""Measure Dif-MAML's theory on the sinusoid task with the in-process simulator (Theorem 1 and its corollaries).

(a) steady-state disagreement (1/K) sum_k ||w_k - w_c||^2 against the step size mu (SGD, paper6 graph):
    the log-log slope should be 2 (disagreement = O(mu^2));
(b) disagreement against the mixing rate lambda_2 across topologies with 6 agents, next to the predicted
    lambda_2^2 / (1 - lambda_2)^2 trend;
(c) from independent random starts, the early geometric decay of the disagreement: fitted per-iteration
    factor next to lambda_2^2 (the squared distance contracts by at most lambda_2^2 per combination).

(a) and (b) start every agent from one shared "launch point" (2000 iterations of centralized Adam), so that all
step sizes and graphs are measured at the same operating point, and average the disagreement over the last
``--window`` of ``--iterations`` SGD iterations.

Run: .venv/bin/python launch/theory_sinusoid.py --out docs/figures [--seeds 0 1 2]
(figures need matplotlib: pip install -e '.[plots]').
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dif_maml_dist.config import Config, TopologyConfig
from dif_maml_dist.engine.figures import centroid_and_disagreement
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from dif_maml_dist.graphs.weights import metropolis_weights, mixing_rate
from dif_maml_dist.run.validate import validate


def config(optim: str, lr: float, seed: int, init: str = "shared") -> Config:
    cfg = Config(seed=seed)
    cfg.optim.name, cfg.optim.lr, cfg.train.init = optim, lr, init
    return validate(cfg)


def launch_point(iterations: int) -> torch.Tensor:
    """A common operating point: the model after ``iterations`` of centralized Adam."""
    cfg = config("adam", 0.001, seed=100)
    sim = Simulation(cfg, strategy_weights("centralized", build_topology(cfg.topology)))
    for _ in range(iterations):
        sim.step()
    return sim.params[0].detach().clone()


def disagreement_trace(cfg: Config, weights: np.ndarray, iterations: int, start: torch.Tensor | None) -> np.ndarray:
    """Disagreement after each of ``iterations`` lock-step iterations (index 0 = before the first)."""
    sim = Simulation(cfg, weights)
    if start is not None:
        with torch.no_grad():
            sim.params.copy_(start.expand_as(sim.params))
    trace = [centroid_and_disagreement(sim.params.detach())[1]]
    for _ in range(iterations):
        sim.step()
        trace.append(centroid_and_disagreement(sim.params.detach())[1])
    return np.array(trace)


def fit_slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def graphs() -> dict[str, np.ndarray]:
    """Six-agent graphs from well mixed to poorly mixed (Metropolis weights)."""
    out = {name: build_topology(TopologyConfig(name=name, num_agents=6)).weights
           for name in ("complete", "star", "ring")}
    out["grid 2x3"] = build_topology(TopologyConfig(name="grid", rows=2, cols=3)).weights
    out["paper6"] = build_topology(TopologyConfig(name="paper6")).weights
    out["erdos_renyi p=0.5"] = build_topology(TopologyConfig(name="erdos_renyi", num_agents=6, edge_prob=0.5)).weights
    out["path"] = metropolis_weights(nx.path_graph(6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure Dif-MAML's disagreement theory on sinusoid.")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # SGD at mu = 0.008 diverges on this task (the agent with amplitudes near 5 first): a decade and more below.
    ap.add_argument("--mus", type=float, nargs="+", default=[0.00025, 0.0005, 0.001, 0.002, 0.004])
    ap.add_argument("--topology-mu", type=float, default=0.005)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=2000, help="centralized Adam iterations to the launch point")
    ap.add_argument("--decay-iterations", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    paper6 = build_topology(TopologyConfig(name="paper6")).weights
    start = launch_point(args.warmup)

    # (a) disagreement vs mu
    mu_rows = []
    for mu in args.mus:
        vals = [disagreement_trace(config("sgd", mu, s), paper6, args.iterations, start)[-args.window:].mean()
                for s in args.seeds]
        mu_rows.append((mu, float(np.mean(vals)), float(np.std(vals))))
        print(f"(a) mu={mu:<8g} disagreement {np.mean(vals):.3e} ± {np.std(vals):.1e}", flush=True)
    finite = [r for r in mu_rows if np.isfinite(r[1])]
    if len(finite) < len(mu_rows):
        print(f"(a) diverged (left out of the fit): mu = {[r[0] for r in mu_rows if not np.isfinite(r[1])]}")
    mu_rows = finite
    slope_mu = fit_slope([r[0] for r in mu_rows], [r[1] for r in mu_rows])
    print(f"(a) log-log slope of disagreement vs mu: {slope_mu:.3f} (Theorem 1: 2)\n", flush=True)

    # (b) disagreement vs lambda_2
    topo_rows = []
    for name, a in graphs().items():
        lam = mixing_rate(a)
        vals = [disagreement_trace(config("sgd", args.topology_mu, s), a, args.iterations, start)[-args.window:].mean()
                for s in args.seeds]
        pred = lam ** 2 / (1 - lam) ** 2
        topo_rows.append((name, lam, pred, float(np.mean(vals)), float(np.std(vals))))
        print(f"(b) {name:18s} lambda_2={lam:.4f}  lambda^2/(1-lambda)^2={pred:8.3f}  disagreement "
              f"{np.mean(vals):.3e}", flush=True)
    fit = [(r[2], r[3]) for r in topo_rows if r[1] > 1e-6]
    slope_lam = fit_slope(*zip(*fit))
    print(f"(b) log-log slope of disagreement vs lambda^2/(1-lambda)^2 (graphs with lambda_2 > 0): "
          f"{slope_lam:.3f} (bound: at most 1)\n", flush=True)

    # (c) early geometric decay from independent random starts
    decay_rows = []
    for name in ("paper6", "ring", "path"):
        a = graphs()[name]
        lam = mixing_rate(a)
        traces = np.array([disagreement_trace(config("sgd", args.topology_mu, s, init="per_agent"), a,
                                              args.decay_iterations, None) for s in args.seeds])
        trace = traces.mean(0)
        # Fit over the geometric phase: from iteration 1 until the trace is within 10x of its final floor.
        floor = trace[-5:].mean()
        end = int(np.argmax(trace < 10 * floor)) or len(trace)
        end = max(end, 4)
        rate = float(np.exp(np.polyfit(np.arange(1, end), np.log(trace[1:end]), 1)[0]))
        decay_rows.append((name, lam, lam ** 2, rate, end, trace))
        print(f"(c) {name:8s} fitted factor per iteration {rate:.4f} over iterations 1..{end - 1}; "
              f"lambda_2^2 = {lam ** 2:.4f}", flush=True)

    with (args.out / "theory_mu.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mu", "disagreement_mean", "disagreement_std"])
        w.writerows(mu_rows)
    with (args.out / "theory_topology.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph", "lambda2", "lambda2^2/(1-lambda2)^2", "disagreement_mean", "disagreement_std"])
        w.writerows(topo_rows)
    with (args.out / "theory_decay.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph", "iteration", "disagreement"])
        for name, *_, trace in decay_rows:
            w.writerows((name, i, v) for i, v in enumerate(trace))
    try:
        plot(args.out, mu_rows, slope_mu, topo_rows, slope_lam, decay_rows)
        print(f"figures and CSVs in {args.out}")
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[plots]'): CSVs only, in {args.out}", file=sys.stderr)


def plot(out: Path, mu_rows, slope_mu, topo_rows, slope_lam, decay_rows) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    mu, d, sd = (np.array(c) for c in zip(*mu_rows))
    ax = axes[0]
    ax.errorbar(mu, d, yerr=sd, fmt="o-", label=f"measured (slope {slope_mu:.2f})")
    ax.plot(mu, d[0] * (mu / mu[0]) ** 2, "k--", label="slope 2 (Theorem 1)")
    ax.set(xscale="log", yscale="log", xlabel="step size mu (SGD)", ylabel="steady-state disagreement",
           title="(a) disagreement vs mu, paper6")
    ax.set_xticks(mu, [f"{m:g}" for m in mu])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    ax = axes[1]
    for j, (name, lam, pred, dm, _) in enumerate(r for r in topo_rows if r[1] > 1e-6):
        ax.scatter(pred, dm)
        ax.annotate(f"{name} (λ₂={lam:.2f})", (pred, dm), fontsize=8, xytext=(4, 6 if j % 2 else -10),
                    textcoords="offset points")
    xs = np.array([r[2] for r in topo_rows if r[1] > 1e-6])
    ys = np.array([r[3] for r in topo_rows if r[1] > 1e-6])
    ref = np.exp(np.mean(np.log(ys) - np.log(xs)))
    grid = np.geomspace(xs.min(), xs.max(), 20)
    ax.plot(grid, ref * grid, "k--", label="∝ λ₂²/(1−λ₂)²")
    ax.set(xscale="log", yscale="log", xlabel="λ₂² / (1 − λ₂)²", ylabel="steady-state disagreement",
           title=f"(b) disagreement vs mixing rate (fitted slope {slope_lam:.2f})")
    ax.legend()
    ax = axes[2]
    for name, lam, lam2, rate, end, trace in decay_rows:
        line, = ax.plot(trace, label=f"{name}: fitted {rate:.3f}/it, λ₂² = {lam2:.3f}")
        ax.plot(np.arange(len(trace)), trace[1] * lam2 ** (np.arange(len(trace)) - 1.0), "--",
                color=line.get_color(), alpha=0.6)
    ax.set(yscale="log", xlabel="iteration", ylabel="disagreement",
           title="(c) decay from random starts (dashed: λ₂^(2i))")
    ax.set_ylim(bottom=min(r[5].min() for r in decay_rows) / 3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "theory_sinusoid.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
