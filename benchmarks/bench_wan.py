"""Time per iteration over emulated links (launch/emulated_wan.py; root needed): 6 agents as six torchrun nodes in
their own network namespaces, per link and workload, synchronous (adapt-then-combine) next to overlapped
(strategy.overlap=true), to bounded staleness (strategy.staleness=S) and to the same agents with no exchange at all
(noncooperative: the compute-only time); with each run's final test loss (and accuracy, for classification).

    sudo .venv/bin/python benchmarks/bench_wan.py [--workloads sinusoid omniglot] [--links lan wan poor]
        [--modes ...] [--staleness S] [--iterations N] [--data-root DIR] [--out results.json]
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

from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

REPO = Path(__file__).resolve().parent.parent
#: name -> (delay ms, jitter ms, rate Mbit/s, loss %)
LINKS = {"lan": (0.2, 0.0, 1000.0, 0.0), "wan": (20.0, 0.0, 100.0, 0.0), "poor": (50.0, 0.0, 10.0, 1.0)}
#: name -> hydra overrides
WORKLOADS = {"sinusoid": ["task=sinusoid"],
             "omniglot": ["task=omniglot_5w1s", "task.eval_tasks=16", "task.final_eval_tasks=16"]}
#: name -> overrides of the way agents cooperate
MODES = {"compute only": ["strategy=noncooperative"], "synchronous": ["strategy=dif_maml"],
         "overlapped": ["strategy=dif_maml", "strategy.overlap=true"],
         "stale": ["strategy=dif_maml"]}  # + strategy.staleness=S (--staleness)


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
        name: str) -> tuple[float, dict[str, float]]:
    """Seconds per iteration and the run's final figures (mean over agents of the test loss after adaptation,
    and accuracy where there is one)."""
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
    summary = json.loads((run_dir / "summary.json").read_text())
    final = {"loss": summary["mean_final_test_loss"]}
    if summary.get("mean_final_test_accuracy") is not None:
        final["accuracy"] = summary["mean_final_test_accuracy"]
    return seconds_per_iteration(run_dir, 6), final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["sinusoid"], choices=list(WORKLOADS))
    ap.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    ap.add_argument("--modes", nargs="+", default=["compute only", "synchronous", "overlapped"], choices=list(MODES))
    ap.add_argument("--staleness", type=int, default=4, help="mode stale: strategy.staleness")
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
                figures, finals = {}, {}
                for mode in args.modes:
                    name = f"{workload}-{link}-{mode.replace(' ', '_')}"
                    overrides = MODES[mode] + ([f"strategy.staleness={args.staleness}"] if mode == "stale" else [])
                    figures[mode], finals[mode] = run(link, WORKLOADS[workload], overrides, args.iterations, extra,
                                                      Path(scratch), name)
                    print(f"  {name}: {1e3 * figures[mode]:.1f} ms/iteration, final {finals[mode]}", flush=True)
                rows.append({"workload": workload, "link": link, "link_settings": LINKS[link], **figures,
                             "final": finals})
    print(share.report())
    label = {m: f"stale s={args.staleness}" if m == "stale" else m for m in args.modes}
    print(f"\n6 agents, paper6 graph, {args.iterations} iterations, extra overrides {extra or 'none'}")
    print("ms per iteration (ratio to compute only)")
    print(f"{'workload':10} {'link':6} " + " ".join(f"{label[m]:>22}" for m in args.modes))
    for r in rows:
        c = r.get("compute only")
        cells = [f"{1e3 * r[m]:10.1f}" + (f" ({r[m] / c:5.2f}x)" if c else "") for m in args.modes]
        print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    print("final test loss after adaptation, mean over agents (accuracy)")
    for r in rows:
        cells = [f"{f['loss']:.4f}" + (f" ({100 * f['accuracy']:.1f} %)" if "accuracy" in f else "")
                 for f in (r["final"][m] for m in args.modes)]
        print(f"{r['workload']:10} {r['link']:6} " + " ".join(f"{cell:>22}" for cell in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"iterations": args.iterations, "staleness": args.staleness,
                                              "extra": extra, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
