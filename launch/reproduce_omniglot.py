"""Omniglot few-shot classification with 6 agents as 6 torchrun processes: the three strategies side by side.

Runs (unless their run directories already hold results) one torchrun job per strategy,

    torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train task=TASK data.root=DATA strategy=S \\
        train.iterations=N train.eval_every=E hydra.run.dir=RUNS/S

then writes, from the runs' summaries and metrics,

- ``omniglot_<task>_accuracy.csv`` / ``.png``: test accuracy (100 tasks, after one adaptation step) every
  ``eval_every`` iterations, per strategy: the mean of the agents' own models, and the centroid model;
- ``omniglot_<task>_final.csv``: final accuracy on the 600 test tasks with its 95% confidence half-width, per agent
  and for the centroid, after 0, 1 and 10 adaptation steps, with the wall times;

and prints the table for docs/results.md.

Run: .venv/bin/python launch/reproduce_omniglot.py --data DIR --runs runs/omniglot --out docs/figures
     [--task omniglot_5w1s] [--iterations 600] [--eval-every 100]
(DIR holds omniglot-py/; the figure needs matplotlib: pip install -e '.[plots]').
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from _figures import pyplot  # launch/_figures.py, beside this script

STRATEGIES = ("dif_maml", "centralized", "noncooperative")


def run(task: str, data: Path, strategy: str, iterations: int, eval_every: int, run_dir: Path) -> None:
    if (run_dir / "summary.json").is_file():
        print(f"{strategy}: using the finished run in {run_dir}", file=sys.stderr)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=6",
           "-m", "dif_maml_dist.train", f"task={task}", f"data.root={data}", f"strategy={strategy}",
           f"train.iterations={iterations}", f"train.eval_every={eval_every}", f"hydra.run.dir={run_dir}"]
    print("running:", " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding omniglot-py/")
    ap.add_argument("--runs", type=Path, default=Path("runs/omniglot"))
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--task", default="omniglot_5w1s")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    curves, finals = {}, []
    for s in STRATEGIES:
        run_dir = args.runs / s
        run(args.task, args.data, s, args.iterations, args.eval_every, run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        network = [json.loads(line) for line in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
        per_agent = []
        for a in summary["agents"]:
            lines = (run_dir / "metrics" / f"agent{a['agent']}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            per_agent.append({r["iteration"]: r["test_acc_post"] for r in records if "test_acc_post" in r})
        curves[s] = [(r["iteration"], sum(acc[r["iteration"]] for acc in per_agent) / len(per_agent),
                      r["centroid_test_acc_post"]) for r in network]
        training_s = network[-1]["wall_s"]  # the last evaluation closes the training loop
        members = [("centroid", summary["centroid_accuracy_curve"], summary["centroid_test_accuracy_ci95"])]
        members += [(f"agent{a['agent']}", a["accuracy_curve"], a["final_test_accuracy_ci95"])
                    for a in summary["agents"]]
        for who, curve, ci in members:
            finals.append({"strategy": s, "model": who, "acc_0_steps": curve[0], "acc_1_step": curve[1],
                           "ci95_1_step": ci, "acc_10_steps": curve[-1], "training_s": round(training_s, 1),
                           "wall_s": round(summary["wall_seconds"], 1), "iterations": summary["iterations"]})

    stem = args.out / f"omniglot_{args.task.removeprefix('omniglot_')}"
    with open(f"{stem}_accuracy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *(f"{s}_{who}" for s in STRATEGIES for who in ("agents_mean", "centroid"))])
        for row in zip(*(curves[s] for s in STRATEGIES)):
            w.writerow([row[0][0], *(f"{acc:.4f}" for _, mean, cen in row for acc in (mean, cen))])
    with open(f"{stem}_final.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(finals[0]))
        w.writeheader()
        w.writerows(finals)

    print("| strategy | centroid, 1 step | agents, 1 step (mean, range) | centroid, 0 → 10 steps | "
          "training / total wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    for s in STRATEGIES:
        rows = [r for r in finals if r["strategy"] == s]
        c, agents = rows[0], [r["acc_1_step"] for r in rows[1:]]
        print(f"| {s} | **{100 * c['acc_1_step']:.1f} ± {100 * c['ci95_1_step']:.1f}%** | "
              f"{100 * sum(agents) / len(agents):.1f}% ({100 * min(agents):.1f} – {100 * max(agents):.1f}) | "
              f"{100 * c['acc_0_steps']:.1f}% → {100 * c['acc_10_steps']:.1f}% | "
              f"{c['training_s']:.0f} / {c['wall_s']:.0f} |")

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, colour in zip(STRATEGIES, ("C0", "C1", "C2")):
        its, mean, cen = zip(*curves[s])
        ax.plot(its, mean, marker="o", color=colour, label=f"{s}: mean of agents")
        ax.plot(its, cen, ls="--", color=colour, alpha=0.6, label=f"{s}: centroid")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (100 tasks, after 1 step)")
    ax.set_title(f"Omniglot {args.task.removeprefix('omniglot_')}, 6 agents (torchrun, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
