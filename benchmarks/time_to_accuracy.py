"""Time to accuracy over a slow link, composed from two measurements: how many iterations each way of exchanging
needs to reach a target accuracy (from training runs, on any network), and how long one iteration of it takes on
the link (``bench_wan.py --out``).

    .venv/bin/python benchmarks/time_to_accuracy.py --timings thin.json [more.json] --link thin \\
        --runs none=runs/omniglot300/none sign=runs/omniglot300/sign ... [--reference none] [--within 1]
    .venv/bin/python benchmarks/time_to_accuracy.py --seconds none=13.55 sign=2.18 --runs ...

``--seconds`` takes the time per iteration measured elsewhere (on your own network, or a table of
docs/results.md) in place of ``bench_wan.py`` files.

Why composing is exact, not an estimate: a run's models do not depend on the network's timing (the emulated
links only delay bytes; ``tests/test_wan.py`` checks that a run across them equals the simulator bit for bit, and
the simulator equals torchrun on loopback), so the run on the slow link would pass through the same accuracies
at the same iterations, only later. The time is the slowest agent's time in training steps, evaluations left out.

Each run's evaluations are its centroid's accuracy after adaptation at every ``train.eval_every`` (network.jsonl:
``task.eval_tasks`` tasks) and, at the last iteration, its final evaluation (summary.json: ``task.final_eval_tasks``
tasks). The target is the reference run's final accuracy less ``--within`` points; a run reaches it at its first
evaluation at or above it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, centroid accuracy after adaptation) at each evaluation after the start, the last one being the
    final evaluation's."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("centroid_test_accuracy") is None:
        raise SystemExit(f"time_to_accuracy: {run_dir} is not a classification run (no centroid_test_accuracy in "
                         f"its summary.json)")
    last = summary["iterations"]
    points = [(r["iteration"], r["centroid_test_acc_post"])
              for r in map(json.loads, (run_dir / "metrics" / "network.jsonl").read_text().splitlines())
              if 0 < r["iteration"] < last and "centroid_test_acc_post" in r]
    return points + [(last, summary["centroid_test_accuracy"])]


def read_timings(paths: list[str], link: Optional[str], mode: str) -> dict[str, float]:
    """Seconds per iteration per way of exchanging, for one link and mode, from bench_wan.py --out files."""
    if link is None:
        raise SystemExit("time_to_accuracy: --timings needs --link (the link whose time per iteration to use)")
    seconds: dict[str, float] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["link"] == link:  # a run of only --exchanges none labels its columns without ", none"
                seconds.update({"none" if k == mode else k.removeprefix(f"{mode}, "): v for k, v in row.items()
                                if isinstance(v, float) and (k == mode or k.startswith(f"{mode}, "))})
    return seconds


def parse_seconds(specs: list[str]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            seconds[name] = float(value) if sep else -1.0
        except ValueError:
            seconds[name] = -1.0
        if seconds[name] <= 0:
            raise SystemExit(f"time_to_accuracy: --seconds {spec!r} must be EXCHANGE=SECONDS, a positive number")
    return seconds


def first_reaching(points: list[tuple[int, float]], target: float) -> Optional[int]:
    return next((it for it, acc in points if acc >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    given = ap.add_mutually_exclusive_group(required=True)
    given.add_argument("--timings", nargs="+", help="bench_wan.py --out files (with --link)")
    given.add_argument("--seconds", nargs="+", metavar="EXCHANGE=S", help="seconds per iteration per way of "
                       "exchanging, measured elsewhere")
    ap.add_argument("--link", help="with --timings: the link whose time per iteration to use (e.g. thin)")
    ap.add_argument("--runs", nargs="+", required=True, metavar="EXCHANGE=RUN_DIR",
                    help="a training run per way of exchanging, named as in bench_wan.py --exchanges")
    ap.add_argument("--mode", default="synchronous", help="the runs' mode, as bench_wan.py names it")
    ap.add_argument("--reference", default="none", help="the run whose final accuracy sets the target")
    ap.add_argument("--within", type=float, default=1.0, help="target: the reference's final accuracy less this "
                    "many points")
    args = ap.parse_args()

    seconds = read_timings(args.timings, args.link, args.mode) if args.timings else parse_seconds(args.seconds)
    runs: dict[str, Path] = {}
    for spec in args.runs:
        name, sep, run_dir = spec.partition("=")
        if not sep or not (Path(run_dir) / "summary.json").is_file():
            raise SystemExit(f"time_to_accuracy: --runs {spec!r} must be EXCHANGE=RUN_DIR of a finished run "
                             f"(with summary.json)")
        if name not in seconds:
            raise SystemExit(f"time_to_accuracy: no time per iteration for '{name}'" + (
                f" ({args.mode}) on link {args.link} in {', '.join(args.timings)}; measure it with bench_wan.py "
                f"--links {args.link} --modes {args.mode} --exchanges {name} --out FILE" if args.timings else
                f"; add {name}=SECONDS to --seconds"))
        runs[name] = Path(run_dir)
    if args.reference not in runs:
        raise SystemExit(f"time_to_accuracy: --reference {args.reference} is not among --runs")

    points = {name: evaluations(run_dir) for name, run_dir in runs.items()}
    target = points[args.reference][-1][1] - args.within / 100
    reached = {name: first_reaching(p, target) for name, p in points.items()}
    ref_it = reached[args.reference]
    ref_s = ref_it * seconds[args.reference] if ref_it is not None else None
    iterations = sorted({it for p in points.values() for it, _ in p})
    where = f"link {args.link}, {args.mode}" if args.timings else "--seconds"
    print(f"{where}; target: {100 * target:.1f} % centroid accuracy ({args.reference}'s final "
          f"{100 * points[args.reference][-1][1]:.1f} % less {args.within:g} points)")
    print(f"{'exchange':10} {'s/iteration':>11} " + " ".join(f"{'acc @' + str(i):>9}" for i in iterations)
          + f" {'reached at':>10} {'time':>9} {'vs ' + args.reference:>10}")
    for name, p in points.items():
        per_it = seconds[name]
        accs = dict(p)
        cells = " ".join(f"{100 * accs[i]:8.1f}%" if i in accs else f"{'-':>9}" for i in iterations)
        it = reached[name]
        time = f"{it * per_it:8.0f}s" if it is not None else f"{'never':>9}"
        ratio = f"{it * per_it / ref_s:9.2f}x" if it is not None and ref_s else f"{'-':>10}"
        print(f"{name:10} {per_it:11.2f} {cells} {it if it is not None else '-':>10} {time} {ratio}")


if __name__ == "__main__":
    main()
