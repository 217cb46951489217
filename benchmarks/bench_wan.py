"""Time per iteration over emulated links (launch/emulated_wan.py; root needed): 6 agents as six torchrun nodes in
their own network namespaces, per link and workload, synchronous (adapt-then-combine) next to overlapped
(strategy.overlap=true) and to the same agents with no exchange at all (noncooperative: the compute-only time).

    sudo .venv/bin/python benchmarks/bench_wan.py [--workloads sinusoid omniglot] [--links lan wan poor]
        [--iterations N] [--data-root DIR] [--out results.json] [--extra OVERRIDE ...]

The time per iteration is an agent's time in its training steps (compute_s + exchange_s: sampling, meta-gradient,
optimizer step, exchange and combine) between its first logged iteration and its last, for the slowest agent
(agents wait for each other, so all see nearly the same). It leaves out the loop's bookkeeping at logged
iterations (a network-wide check for divergence: an all-gather, several link latencies over a slow link), which
a longer run amortises. Ratios are to the compute-only run on the same link.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

REPO = Path(__file__).resolve().parent.parent
#: name -> (delay ms, jitter ms, rate Mbit/s, loss %)
LINKS = {"lan": (0.2, 0.0, 1000.0, 0.0), "wan": (20.0, 0.0, 100.0, 0.0), "poor": (50.0, 0.0, 10.0, 1.0)}
#: name -> hydra overrides
WORKLOADS = {"sinusoid": ["task=sinusoid"],
             "omniglot": ["task=omniglot_5w1s", "task.eval_tasks=16", "task.final_eval_tasks=16"]}
#: name -> overrides of the way agents cooperate
MODES = {"compute only": ["strategy=noncooperative"], "synchronous": ["strategy=dif_maml"],
         "overlapped": ["strategy=dif_maml", "strategy.overlap=true"]}


def seconds_per_iteration(run_dir: Path, agents: int) -> float:
    """The slowest agent's time in training steps per iteration, between its first logged iteration and its last."""
    worst = 0.0
    for k in range(agents):
        records = [json.loads(x) for x in (run_dir / "metrics" / f"agent{k}.jsonl").read_text().splitlines()]
        logged = [r for r in records if "meta_train_loss" in r]
        first, last = logged[0], logged[-1]
        busy = (last["compute_s"] + last["exchange_s"]) - (first["compute_s"] + first["exchange_s"])
        worst = max(worst, busy / (last["iteration"] - first["iteration"]))
    return worst


def run(link: str, workload: list[str], mode: list[str], iterations: int, extra: list[str], scratch: Path,
        name: str) -> float:
    delay, jitter, rate, loss = LINKS[link]
    run_dir = scratch / name
    log_every = max(iterations // 5, 1)
    cmd = [sys.executable, str(REPO / "launch" / "emulated_wan.py"), "run", "--agents", "6", "--delay-ms",
           str(delay), "--jitter-ms", str(jitter), "--rate-mbit", str(rate), "--loss-pct", str(loss),
           "--name", "dmdbench", "--run-dir", str(run_dir), "--",
           *workload, *mode, f"train.iterations={iterations}", f"train.eval_every={iterations}",
           f"train.log_every={log_every}", "maml.final_adapt_steps=1", "train.save_models=false",
           "train.checkpoint_every=0", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_wan: {name} failed:\n{done.stderr[-3000:]}")
    return seconds_per_iteration(run_dir, 6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["sinusoid"], choices=list(WORKLOADS))
    ap.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--data-root", help="omniglot: the dataset folder (data.root)")
    ap.add_argument("--extra", nargs="*", default=[], help="more hydra overrides for every run (e.g. compression=qsgd)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    if "omniglot" in args.workloads and not args.data_root:
        raise SystemExit("bench_wan: --workloads omniglot needs --data-root DIR")
    extra = [*args.extra, *([f"data.root={args.data_root}"] if args.data_root else [])]
    rows = []
    with tempfile.TemporaryDirectory() as scratch, CpuShare() as share:
        for workload in args.workloads:
            for link in args.links:
                figures = {}
                for mode in args.modes:
                    name = f"{workload}-{link}-{mode.replace(' ', '_')}"
                    figures[mode] = run(link, WORKLOADS[workload], MODES[mode], args.iterations, extra,
                                        Path(scratch), name)
                    print(f"  {name}: {1e3 * figures[mode]:.1f} ms/iteration", flush=True)
                rows.append({"workload": workload, "link": link, "link_settings": LINKS[link], **figures})
    print(share.report())
    print(f"\n6 agents, paper6 graph, {args.iterations} iterations, extra overrides {extra or 'none'}")
    print(f"{'workload':10} {'link':6} " + " ".join(f"{m + ' ms':>16}" for m in args.modes)
          + ("   sync/compute  overlap/compute" if {"compute only", "synchronous", "overlapped"} <= set(args.modes)
             else ""))
    for r in rows:
        line = f"{r['workload']:10} {r['link']:6} " + " ".join(f"{1e3 * r[m]:16.1f}" for m in args.modes)
        if {"compute only", "synchronous", "overlapped"} <= set(args.modes):
            c = r["compute only"]
            line += f"   {r['synchronous'] / c:12.2f}  {r['overlapped'] / c:15.2f}"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({"iterations": args.iterations, "extra": extra, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
