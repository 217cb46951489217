"""Bytes against accuracy: every compressor, graph schedule and local-step setting on the sinusoid, side by side.

Runs (unless their run directories already hold results), with the simulator's vectorised engine,

    python -m dif_maml_dist.train runtime=simulate runtime.threads=1 topology=ring topology.num_agents=K seed=S \\
        train.iterations=N train.eval_every=N/12 SETTING... hydra.run.dir=RUNS/ringK/NAME/seedS-KEY

for K in --agents (6 and 16), every setting below and every seed, --jobs at a time (with --omniglot DATA: Omniglot
5-way 1-shot on the paper's 6-agent graph instead, accuracies instead of losses); KEY is a hash of all the
overrides, so runs made with other settings (another --iterations) are never reused as these. Then writes

- ``compression_runs.csv``: one row per run (final test loss after one step, mean over agents and of the centroid,
  bytes sent per agent, disagreement, wall time);
- ``compression_tradeoff.csv`` / ``.png``: per graph and setting, mean and spread over seeds of the final loss
  against the bytes each agent sent (the Pareto figure);
- ``compression_disagreement.png``: disagreement against iteration, mean over seeds;

and prints the table and the goals' status for docs/results.md; the exit status is 1 if any run failed (its log
is RUNS/.../seedS-KEY.log).

    .venv/bin/python launch/reproduce_compression.py --runs runs/compression --out docs/figures
        [--iterations 6000] [--seeds 0 1 2] [--agents 6 16] [--jobs 2] [--only NAME ...]
    .venv/bin/python launch/reproduce_compression.py --omniglot /tmp/omni --iterations 120 --seeds 0 --jobs 1 \
        --only none "topk 10%" "qsgd 4 bit" sign one_peer_exponential --runs runs/compression --out docs/figures
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _figures import pyplot  # launch/_figures.py, beside this script
from _runs import finished, keyed, log_of  # launch/_runs.py

REPO = Path(__file__).resolve().parents[1]

#: name -> overrides; the compressors' consensus steps are their defaults (gossip.consensus_steps).
SETTINGS = {
    "none": [],
    "topk 10%": ["compression=topk", "compression.ratio=0.1"],
    "topk 1%": ["compression=topk", "compression.ratio=0.01"],
    "randk 10%": ["compression=randk", "compression.ratio=0.1"],
    "qsgd 4 bit": ["compression=qsgd", "compression.bits=4"],
    "qsgd 2 bit": ["compression=qsgd", "compression.bits=2"],
    "sign": ["compression=sign"],
    "one_peer_exponential": ["topology.schedule=one_peer_exponential"],
    "random_matching": ["topology.schedule=random_matching"],
    "combine_every 4": ["strategy.combine_every=4"],
    "combine_every 16": ["strategy.combine_every=16"],
}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("%", "pct")


#: Omniglot 5-way 1-shot on the paper's graph (6 agents): the per-agent engine (vmapping Conv4 over agents costs
#: more time and memory than it saves), every core, a smaller final test (300 tasks, 0-1 steps) to fit the schedule.
OMNIGLOT = ["task=omniglot_5w1s", "runtime.vectorize=false", "task.final_eval_tasks=300", "maml.final_adapt_steps=1"]


def run_one(graph: str, name: str, seed: int, iterations: int, runs: Path, data: Path | None) -> Path | None:
    """The run's folder, once it holds a finished run (made now or before); ``None`` if the run failed."""
    if graph == "omniglot":
        where = [*OMNIGLOT, f"data.root={data}"]
    else:
        where = ["runtime.threads=1", "topology=ring", f"topology.num_agents={graph.removeprefix('ring')}"]
    every = max(iterations // (3 if graph == "omniglot" else 12), 1)  # Conv4 evaluations are dear
    overrides = ["runtime=simulate", *where, f"seed={seed}", f"train.iterations={iterations}",
                 f"train.eval_every={every}", f"train.log_every={every}", "train.save_models=false", *SETTINGS[name]]
    run_dir = keyed(runs / graph / slug(name), f"seed{seed}", overrides)
    if finished(run_dir):
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_of(run_dir), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", *overrides, f"hydra.run.dir={run_dir}"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}; see {log_of(run_dir)})"
    print(f"{graph} {name} seed {seed}: {status}", file=sys.stderr, flush=True)
    return run_dir if proc.returncode == 0 else None


def read(run_dir: Path) -> dict | None:
    if not (run_dir / "summary.json").is_file():
        return None
    s = json.loads((run_dir / "summary.json").read_text())
    network = [json.loads(x) for x in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
    agents = s["agents"]
    if "mean_final_test_accuracy" in s:  # classification: the trade-off is in accuracy
        return {"loss": s["mean_final_test_accuracy"], "centroid_loss": s["centroid_test_accuracy"],
                "bytes": statistics.mean(a["bytes_sent"] for a in agents), "disagreement": s["disagreement"],
                "wall_s": s["wall_seconds"], "curve": [(r["iteration"], r["disagreement"]) for r in network]}
    return {"loss": s["mean_final_test_loss"], "centroid_loss": s["centroid_test_loss"],
            "bytes": statistics.mean(a["bytes_sent"] for a in agents), "disagreement": s["disagreement"],
            "wall_s": s["wall_seconds"], "curve": [(r["iteration"], r["disagreement"]) for r in network]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/compression"))
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--iterations", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--agents", type=int, nargs="+", default=[6, 16], help="ring sizes (sinusoid)")
    ap.add_argument("--omniglot", type=Path, default=None, metavar="DATA",
                    help="instead of the sinusoid: Omniglot 5w1s on the paper's graph (DATA holds omniglot-py/); "
                         "the figures are accuracies, the files omniglot_compression_*")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    graphs = ["omniglot"] if args.omniglot else [f"ring{k}" for k in args.agents]
    prefix = "omniglot_compression" if args.omniglot else "compression"
    metric = "final test accuracy, 1 step" if args.omniglot else "final test loss, 1 step"
    data = args.omniglot.resolve() if args.omniglot else None

    jobs = [(g, name, seed) for g in graphs for name in args.only for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda j: run_one(*j, args.iterations, args.runs.resolve(), data), jobs))
    results = {job: read(d) if d is not None else None for job, d in zip(jobs, dirs)}

    with open(args.out / f"{prefix}_runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph", "setting", "seed", f"{metric} (mean over agents)", f"{metric} (centroid)",
                    "bytes_per_agent", "disagreement", "wall_s"])
        for (k, name, seed), r in results.items():
            if r is not None:
                w.writerow([k, name, seed, r["loss"], r["centroid_loss"], r["bytes"], r["disagreement"], r["wall_s"]])

    rows = []
    for k in graphs:
        base = [r["loss"] for (kk, n, _), r in results.items() if kk == k and n == "none" and r]
        base_bytes = [r["bytes"] for (kk, n, _), r in results.items() if kk == k and n == "none" and r]
        for name in args.only:
            got = [r for (kk, n, _), r in results.items() if kk == k and n == name and r]
            if not got:
                rows.append({"graph": k, "setting": name, "runs": 0})
                continue
            loss = [r["loss"] for r in got]
            row = {"graph": k, "setting": name, "runs": len(got), "bytes": statistics.mean(r["bytes"] for r in got),
                   "loss": statistics.mean(loss), "loss_sd": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                   "centroid_loss": statistics.mean(r["centroid_loss"] for r in got),
                   "disagreement": statistics.mean(r["disagreement"] for r in got)}
            if base and base_bytes:
                row["reduction"] = statistics.mean(base_bytes) / row["bytes"] if row["bytes"] else float("inf")
                # loss: relative to none's; accuracy: in points against none's
                row["vs_none"] = (row["loss"] - statistics.mean(base) if args.omniglot
                                  else row["loss"] / statistics.mean(base) - 1)
            rows.append(row)
    fields = ["graph", "setting", "runs", "bytes", "reduction", "loss", "loss_sd", "vs_none", "centroid_loss",
              "disagreement"]
    with open(args.out / f"{prefix}_tradeoff.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)

    print(f"| graph | setting | bytes per agent | fewer bytes | {metric} (mean over agents ± sd over "
          f"{len(args.seeds)} seeds) | vs none | centroid | disagreement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if not r["runs"]:
            print(f"| {r['graph']} | {r['setting']} | no finished run | | | | | |")
            continue
        vs = r.get("vs_none", float("nan"))
        vs = f"{vs * 100:+.1f} pts" if args.omniglot else f"{vs:+.1%}"
        print(f"| {r['graph']} | {r['setting']} | {r['bytes'] / 1e6:.2f} MB | {r.get('reduction', float('nan')):.1f}× "
              f"| {r['loss']:.4f} ± {r['loss_sd']:.4f} | {vs} "
              f"| {r['centroid_loss']:.4f} | {r['disagreement']:.3g} |")
    for k in graphs:
        base = next((r for r in rows if r["graph"] == k and r["setting"] == "none" and r["runs"]), None)
        for factor, within in (((10, 0.01),) if args.omniglot else ((10, 0.05), (30, 0.15))):
            # Loss: within a fraction of none's; accuracy: within that many points below none's.
            ok = [r["setting"] for r in rows if base and r["graph"] == k and r["runs"] and r.get("reduction", 0) >= factor
                  and (-r.get("vs_none", -1) <= within if args.omniglot else r.get("vs_none", 1) <= within)]
            what = f"{within * 100:g} accuracy point" if args.omniglot else f"{within:.0%}"
            print(f"goal {k}: >= {factor}x fewer bytes within {what} of none: "
                  f"{'met by ' + ', '.join(ok) if ok else 'not met'}")

    figures(args, graphs, rows, results, prefix, metric)
    failed = [f"{k} {name} seed {seed}" for (k, name, seed), d in zip(jobs, dirs) if d is None]
    if failed:
        sys.exit(f"reproduce_compression: {len(failed)} run(s) failed ({', '.join(failed)}): the figures lack them; "
                 f"see their logs under {args.runs}, fix the cause and run this again (finished runs are reused)")


def figures(args, graphs: list[str], rows: list[dict], results: dict, prefix: str, metric: str) -> None:
    """The trade-off and disagreement figures (when matplotlib is installed)."""
    plt = pyplot()
    if plt is None:
        return
    color = {name: plt.cm.tab20(i % 20) for i, name in enumerate(SETTINGS)}  # one colour per setting, both figures
    fig, axes = plt.subplots(1, len(graphs), figsize=(6 * len(graphs), 4.5), squeeze=False)
    for ax, k in zip(axes[0], graphs):
        for r in rows:
            if r["graph"] == k and r["runs"]:
                ax.errorbar(r["bytes"], r["loss"], yerr=r["loss_sd"], fmt="o", capsize=3, color=color[r["setting"]])
                ax.annotate(r["setting"], (r["bytes"], r["loss"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per agent (whole run)")
        ax.set_ylabel(f"{metric} (mean over agents)")
        ax.set_title(f"Omniglot 5w1s, paper graph, {args.iterations} iterations" if args.omniglot else
                     f"sinusoid, {k.removeprefix('ring')} agents on a ring, {args.iterations} iterations")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / f"{prefix}_tradeoff.png", dpi=120)
    fig, axes = plt.subplots(1, len(graphs), figsize=(6 * len(graphs), 4.5), squeeze=False)
    for ax, k in zip(axes[0], graphs):
        for name in args.only:
            curves = [r["curve"] for (kk, n, _), r in results.items() if kk == k and n == name and r]
            if not curves:
                continue
            its = [i for i, _ in curves[0]]
            mean = [statistics.mean(c[j][1] for c in curves) for j in range(len(its))]
            ax.plot(its[1:], mean[1:], label=name, color=color[name])
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("disagreement (1/K) Σ‖w_k − w_c‖²")
        ax.set_title(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / f"{prefix}_disagreement.png", dpi=120)


if __name__ == "__main__":
    main()
