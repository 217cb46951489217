"""Time per iteration over emulated links (launch/emulated_wan.py; root needed): 6 agents (``--agents``) as torchrun
nodes in their own network namespaces, per link and workload, synchronous (adapt-then-combine) next to overlapped
(strategy.overlap=true), to bounded staleness (strategy.staleness=S) and to the same agents with no exchange at all
(noncooperative: the compute-only time); with each run's final test loss (and accuracy, for classification).
``--exchanges`` repeats every exchanging mode per way of exchanging (a compressor, a one-peer or matching schedule,
local steps), side by side.

    sudo .venv/bin/python benchmarks/bench_wan.py [--workloads sinusoid omniglot] [--links lan wan poor thin]
        [--modes ...] [--staleness S] [--iterations N] [--eval-every N] [--target LOSS_OR_ACCURACY]
        [--exchanges NAME ...] [--slow-agent FACTOR] [--agents K] [--data-root DIR] [--out results.json]
        [--extra OVERRIDE ...]

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
from typing import Any, Optional

from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

REPO = Path(__file__).resolve().parent.parent
#: name -> (delay ms, jitter ms, rate Mbit/s, loss %)
LINKS = {"lan": (0.2, 0.0, 1000.0, 0.0), "wan": (20.0, 0.0, 100.0, 0.0), "poor": (50.0, 0.0, 10.0, 1.0),
         "thin": (20.0, 0.0, 0.6, 0.0)}  # thin: a Conv4 message takes ~6 s, over 3x its compute here
#: name -> hydra overrides
WORKLOADS = {"sinusoid": ["task=sinusoid"],
             "omniglot": ["task=omniglot_5w1s", "task.eval_tasks=16", "task.final_eval_tasks=16"]}
#: name -> overrides of the way agents cooperate
MODES = {"compute only": ["strategy=noncooperative"], "synchronous": ["strategy=dif_maml"],
         "overlapped": ["strategy=dif_maml", "strategy.overlap=true"],
         "stale": ["strategy=dif_maml"]}  # + strategy.staleness=S (--staleness)
#: name -> overrides of what a round sends, and to whom (--exchanges)
EXCHANGES = {"none": [], "topk": ["compression=topk"], "randk": ["compression=randk"], "qsgd": ["compression=qsgd"],
             "sign": ["compression=sign"], "one-peer": ["topology.schedule=one_peer_exponential"],
             "matching": ["topology.schedule=random_matching"], "every 2": ["strategy.combine_every=2"]}


def records(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """A run's metrics stream ``metrics/NAME.jsonl``, record by record."""
    return [json.loads(x) for x in (run_dir / "metrics" / f"{name}.jsonl").read_text().splitlines()]


def seconds_per_iteration(run_dir: Path, agents: int) -> float:
    """The slowest agent's time in training steps per iteration, between its first logged iteration and its last."""
    worst = 0.0
    for k in range(agents):
        logged = [r for r in records(run_dir, f"agent{k}") if "meta_train_loss" in r]
        first, last = logged[0], logged[-1]
        busy = (last["compute_s"] + last["exchange_s"]) - (first["compute_s"] + first["exchange_s"])
        worst = max(worst, busy / (last["iteration"] - first["iteration"]))
    return worst


def time_to_target(run_dir: Path, agents: int, target: float, metric: str) -> Optional[tuple[int, float]]:
    """The first evaluated iteration at which the centroid's ``metric`` (test loss after adaptation: at most
    ``target``; accuracy: at least) reached ``target``, and the slowest agent's time in training steps up to it;
    None if it never did."""
    key, better = (("centroid_test_loss_post", lambda v: v <= target) if metric == "loss"
                   else ("centroid_test_acc_post", lambda v: v >= target))
    for record in records(run_dir, "network"):
        if record["iteration"] > 0 and key in record and better(record[key]):
            it = record["iteration"]
            busy = 0.0
            for k in range(agents):
                at = next(r for r in records(run_dir, f"agent{k}") if r["iteration"] == it and "compute_s" in r)
                busy = max(busy, at["compute_s"] + at["exchange_s"])
            return it, busy
    return None


def run(link: str, workload: list[str], mode: list[str], iterations: int, extra: list[str], scratch: Path,
        name: str, eval_every: int, target: Optional[float], agents: int) -> tuple[float, dict[str, Any]]:
    """Seconds per iteration and the run's final figures: the centroid's and the agents' mean test loss after
    adaptation (and accuracy, for classification), and with ``target``, when the centroid reached it."""
    delay, jitter, rate, loss = LINKS[link]
    run_dir = scratch / name
    log_every = eval_every  # logged at every evaluation: its record carries the time up to it
    cmd = [sys.executable, str(REPO / "launch" / "emulated_wan.py"), "run", "--agents", str(agents), "--delay-ms",
           str(delay), "--jitter-ms", str(jitter), "--rate-mbit", str(rate), "--loss-pct", str(loss),
           "--name", "dmdbench", "--run-dir", str(run_dir), "--",
           *workload, *mode, f"train.iterations={iterations}", f"train.eval_every={eval_every}",
           f"train.log_every={log_every}", "maml.final_adapt_steps=1", "train.save_models=false",
           "train.checkpoint_every=0", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_wan: {name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    final: dict[str, Any] = {"centroid_loss": summary["centroid_test_loss"], "loss": summary["mean_final_test_loss"]}
    metric = "loss"
    if summary.get("mean_final_test_accuracy") is not None:
        final["centroid_accuracy"] = summary["centroid_test_accuracy"]
        final["accuracy"] = summary["mean_final_test_accuracy"]
        metric = "accuracy"
    if target is not None:
        final["to_target"] = time_to_target(run_dir, agents, target, metric)
    return seconds_per_iteration(run_dir, agents), final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["sinusoid"], choices=list(WORKLOADS))
    ap.add_argument("--links", nargs="+", default=["lan", "wan", "poor"], choices=list(LINKS))
    ap.add_argument("--modes", nargs="+", default=["compute only", "synchronous", "overlapped"], choices=list(MODES))
    ap.add_argument("--staleness", type=int, default=4, help="mode stale: strategy.staleness")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--eval-every", type=int, help="evaluate (and log) every N iterations; default iterations / 5")
    ap.add_argument("--target", type=float, help="also report when the centroid first reached this test loss "
                    "after adaptation (classification: this accuracy, a fraction)")
    ap.add_argument("--data-root", help="omniglot: the dataset folder (data.root)")
    ap.add_argument("--extra", nargs="*", default=[], help="more hydra overrides for every run (e.g. compression=qsgd)")
    ap.add_argument("--exchanges", nargs="+", default=["none"], choices=list(EXCHANGES),
                    help="run every exchanging mode with each of these (EXCHANGES: a compressor, a schedule, "
                    "'every 2' = strategy.combine_every=2), side by side; staleness runs only with none")
    ap.add_argument("--slow-agent", type=float, metavar="FACTOR",
                    help="also run every mode with agent 0 FACTOR times slower (runtime.slowdown)")
    ap.add_argument("--agents", type=int, default=6, help="6: the paper's graph; any other number: a ring (with "
                    "at most as many agents as cores, each computes on a core of its own)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    if "omniglot" in args.workloads and not args.data_root:
        raise SystemExit("bench_wan: --workloads omniglot needs --data-root DIR")
    extra = [*args.extra, *([f"data.root={args.data_root}"] if args.data_root else []),
             *([] if args.agents == 6 else ["topology=ring", f"topology.num_agents={args.agents}"])]
    eval_every = args.eval_every or max(args.iterations // 5, 1)
    if args.iterations % eval_every or args.iterations < 2 * eval_every:
        raise SystemExit(f"bench_wan: --eval-every {eval_every} must divide --iterations {args.iterations} at least "
                         f"twice (it is also the logging interval, and the time per iteration is measured between "
                         f"the first logged iteration and the last)")
    #: column label -> the overrides of its mode
    columns: dict[str, list[str]] = {}
    for exchange in args.exchanges:
        for mode in args.modes:
            if (mode == "compute only" and exchange != args.exchanges[0]) or (mode == "stale" and exchange != "none"):
                continue  # compute only exchanges nothing; staleness refuses compression and changing graphs
            label = f"stale s={args.staleness}" if mode == "stale" else mode
            overrides = MODES[mode] + ([f"strategy.staleness={args.staleness}"] if mode == "stale" else [])
            if mode != "compute only" and args.exchanges != ["none"]:
                label, overrides = f"{label}, {exchange}", overrides + EXCHANGES[exchange]
            columns[label] = overrides
            if args.slow_agent:
                columns[f"{label}, slow 0"] = overrides + [f"runtime.slowdown=[[0,{args.slow_agent:g}]]"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch, CpuShare() as share:
        for workload in args.workloads:
            for link in args.links:
                figures, finals = {}, {}
                for label, overrides in columns.items():
                    name = f"{workload}-{link}-{label.replace(' ', '_').replace(',', '').replace('=', '')}"
                    figures[label], finals[label] = run(link, WORKLOADS[workload], overrides, args.iterations,
                                                        extra, Path(scratch), name, eval_every, args.target,
                                                        args.agents)
                    print(f"  {name}: {1e3 * figures[label]:.1f} ms/iteration, final {finals[label]}", flush=True)
                rows.append({"workload": workload, "link": link, "link_settings": LINKS[link], **figures,
                             "final": finals})
    print(share.report())
    graph = "paper6 graph" if args.agents == 6 else "ring"
    print(f"\n{args.agents} agents, {graph}, {args.iterations} iterations, extra overrides {extra or 'none'}"
          + (f"; 'slow 0': agent 0 {args.slow_agent:g}x slower" if args.slow_agent else ""))
    print("ms per iteration (ratio to compute only)")
    print(f"{'workload':10} {'link':6} " + " ".join(f"{c:>22}" for c in columns))
    for r in rows:
        c = r.get("compute only")
        cells = [f"{1e3 * r[m]:10.1f}" + (f" ({r[m] / c:5.2f}x)" if c else "") for m in columns]
        print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    if args.slow_agent:
        print(f"what agent 0 {args.slow_agent:g}x slower costs the network: slowed / unslowed time per iteration")
        for r in rows:
            cells = [f"{r[f'{c}, slow 0'] / r[c]:.2f}x" for c in columns if not c.endswith("slow 0")]
            print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    print("final test loss after adaptation: centroid / mean over agents (accuracy: centroid / mean)")
    for r in rows:
        cells = [f"{f['centroid_loss']:.3f} / {f['loss']:.3f}" + (
            f" ({100 * f['centroid_accuracy']:.1f} / {100 * f['accuracy']:.1f} %)" if "accuracy" in f else "")
            for f in (r["final"][m] for m in columns)]
        print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    if args.target is not None:
        print(f"time in training steps until the centroid reached {args.target:g} (iteration)")
        for r in rows:
            cells = [f"{f['to_target'][1]:.1f} s ({f['to_target'][0]})" if f["to_target"] else "not reached"
                     for f in (r["final"][m] for m in columns)]
            print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"iterations": args.iterations, "staleness": args.staleness,
                                              "extra": extra, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
