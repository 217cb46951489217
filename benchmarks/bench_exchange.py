"""Exchange time vs compute time per iteration, 6 agents as real torchrun processes, per strategy.

For each strategy (dif_maml, centralized, noncooperative) this launches

    torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train strategy=S train.iterations=N
             train.eval_every=N train.save_models=false hydra.run.dir=TMP/S

one strategy after the other, reads ``TMP/S/summary.json`` and prints, per strategy: iterations per second
of the whole run, the mean (over agents) time per iteration spent computing (task sampling, meta-gradient,
optimizer step) and exchanging (the combine step, communication and waiting included), their ratio, the bytes
each agent sends per iteration, and each strategy's speed relative to noncooperative (no exchange).

    .venv/bin/python benchmarks/bench_exchange.py            # N = 2000 (about 1.5 minutes on 2 idle cores)
    .venv/bin/python benchmarks/bench_exchange.py --quick    # N = 300 (about 50 s: torchrun start-up, ~12 s a run, dominates)
    .venv/bin/python benchmarks/bench_exchange.py --iterations 500 --strategies dif_maml noncooperative
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("dif_maml", "centralized", "noncooperative")
AGENTS = 6  # the paper's 6-agent graph (topology=paper6, the default)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 iterations per strategy instead of 2000")
    p.add_argument("--iterations", type=int, default=None, help="iterations per strategy (overrides --quick)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one torchrun may take before it is killed")
    args = p.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be at least 1")
    return args


def torchrun_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def run_strategy(strategy: str, iterations: int, tmp: Path, timeout: float) -> tuple[dict, float]:
    """Launch one 6-process run; returns (summary.json, seconds the whole torchrun took). Exits on failure."""
    run_dir = tmp / strategy
    cmd = torchrun_cmd() + ["--standalone", f"--nproc-per-node={AGENTS}", "-m", "dif_maml_dist.train",
                            f"strategy={strategy}", f"train.iterations={iterations}", f"train.eval_every={iterations}",
                            "train.save_models=false", f"hydra.run.dir={run_dir}"]
    log_path = tmp / f"{strategy}.out"
    print(f"  running {strategy:<15} ...", end="", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        # Own process group, so that a timeout ends torchrun and its agent processes together.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = f"timeout after {timeout:.0f} s"
    elapsed = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        print(" FAILED")
        lines = log_path.read_text(errors="replace").splitlines()
        # The workers' own messages come before torchrun's long ChildFailedError report: show them first.
        cut = next((i for i, line in enumerate(lines) if "Traceback" in line and "elastic" in "".join(lines[i:i + 12])),
                   len(lines))
        shown = lines[max(0, cut - 20):cut] or lines[-30:]
        sys.exit(f"ABORT: {strategy} run failed (exit {rc}) after {elapsed:.1f} s:\n  {' '.join(cmd)}\n"
                 + "\n".join("  | " + line for line in shown))
    print(f" done in {elapsed:5.1f} s")
    return json.loads(summary_path.read_text()), elapsed


def figures(summary: dict) -> dict:
    its = summary["iterations"]
    agents = summary["agents"]
    mean = lambda key: sum(a[key] for a in agents) / len(agents)  # noqa: E731
    compute_ms = mean("compute_seconds") / its * 1e3
    exchange_ms = mean("exchange_seconds") / its * 1e3
    return {
        "iterations": its,
        "wall_s": summary["wall_seconds"],
        "it_s": its / summary["wall_seconds"],
        "compute_ms": compute_ms,
        "exchange_ms": exchange_ms,
        "step_it_s": 1e3 / (compute_ms + exchange_ms),
        "ratio": exchange_ms / compute_ms if compute_ms > 0 else float("nan"),
        "bytes_it": mean("bytes_sent") / its,
        "path": summary.get("meta_grad_path", "?"),
        "backend": summary.get("backend", "?"),
        "params": summary.get("parameters", 0),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    iterations = args.iterations if args.iterations is not None else (300 if args.quick else 2000)
    cores = os.cpu_count()
    print(f"Exchange vs compute per iteration: {AGENTS} agents (paper6 graph), one torchrun process each, "
          f"{iterations} iterations per strategy, {cores} CPU core(s)")
    print(f"launcher: {' '.join(torchrun_cmd())} --standalone --nproc-per-node={AGENTS} -m dif_maml_dist.train "
          f"strategy=S train.iterations={iterations} train.eval_every={iterations} train.save_models=false "
          f"hydra.run.dir=TMP/S")
    share = CpuShare().start()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_exchange_") as tmp:
        for strategy in args.strategies:
            summary, elapsed = run_strategy(strategy, iterations, Path(tmp), args.timeout)
            results[strategy] = {**figures(summary), "launch_s": elapsed}
    share.stop()
    first = next(iter(results.values()))
    print(f"\n(meta-gradient path {first['path']}, backend {first['backend']}, "
          f"{first['params']} float32 parameters = {first['params'] * 4} bytes per model)\n")

    base = results.get("noncooperative")
    head = (f"{'strategy':<15} {'it/s':>7} {'step it/s':>10} {'compute ms/it':>14} {'exchange ms/it':>15} {'exch/comp':>10} "
            f"{'bytes/it/agent':>15} {'it/s vs noncoop':>16} {'run wall s':>11} {'torchrun s':>11}")
    print(head)
    print("-" * len(head))
    for strategy, r in results.items():
        rel = f"{r['it_s'] / base['it_s']:.2f}x" if base else "n/a"
        print(f"{strategy:<15} {r['it_s']:>7.1f} {r['step_it_s']:>10.1f} {r['compute_ms']:>14.3f} {r['exchange_ms']:>15.3f} "
              f"{r['ratio']:>9.2f}x {r['bytes_it']:>15.0f} {rel:>16} {r['wall_s']:>11.1f} {r['launch_s']:>11.1f}")
    print("-" * len(head))
    print("it/s = iterations / wall_seconds of the run (rank 0's whole training loop, including the evaluations at "
          "the start and the end);")
    print("step it/s = 1000 / (compute + exchange ms/it): the training steps alone; compute/exchange ms/it = mean over "
          f"the {AGENTS} agents of")
    print("compute_seconds / exchange_seconds per iteration; bytes/it/agent = mean bytes_sent / iterations "
          "(centralized: the ring all-reduce volume);")
    print("torchrun s = the whole launch (process start-up, rendezvous, imports, evaluation, teardown) as seen "
          "from here.")
    if cores is not None and cores < AGENTS:
        print(f"NOTE: {AGENTS} processes share {cores} core(s) here (oversubscription), so \"exchange\" time is mostly "
              "waiting for slower neighbours to be scheduled")
        print("      and finish their compute, not data transfer: that is why it dominates. Without exchange "
              "(noncooperative) the same contention")
        print("      shows up as longer compute time instead (processes are descheduled mid-computation).")
    print(share.report())

if __name__ == "__main__":
    main()
