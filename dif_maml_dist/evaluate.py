"""Use what a run learned: load its saved models, adapt them to new tasks, evaluate them (the Python API is
``dif_maml_dist.load_run``, ``run/saved.py``).

Command line (also ``dif-maml-evaluate``)::

    python -m dif_maml_dist.evaluate RUN_DIR [--model centroid|agent<k>|all] [--steps N] [--tasks N] [--seed S]
        [--episodes DIR] [--json FILE] [--device cpu|cuda] [--data-root DIR] [--test-root DIR]

prints loss (and accuracy with its 95% confidence half-width) after 0..N adaptation steps on test tasks of the
run's task family, and writes the same as JSON (default ``RUN_DIR/evaluation.json``; the run's own files are
never written). By default the test set is the run's own final one, so the figures are the run's final figures;
``--episodes DIR`` evaluates on your own few-shot episodes instead (``tasks/user_episodes.py`` has the layout).
A figure that is undefined (the 95% half-width of a single task, the loss of a diverged model) is ``None``
(``null`` in the JSON, left out of the table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from dif_maml_dist.run.files import unwritable, write_json_atomic
from dif_maml_dist.run.launch import plain
from dif_maml_dist.run.outputs import RUN_OWN_DIRS
from dif_maml_dist.run.saved import MAX_STEPS, MAX_TASKS, EvaluateError, load_run

EXIT_USAGE = 2
#: What a run writes itself: an evaluation never writes there.
RUN_OWN = ("summary.json", ".lock")
def _json_path(run_dir: Path, given: Optional[str]) -> Path:
    path = Path(given) if given else run_dir / "evaluation.json"
    resolved, root = path.resolve(), run_dir.resolve()
    inside = resolved.relative_to(root).parts if resolved.is_relative_to(root) else ()
    if inside and (inside[0] in RUN_OWN_DIRS or (len(inside) == 1 and inside[0] in RUN_OWN)):
        raise EvaluateError(f"--json {path} would overwrite the run's own files; choose another file")
    if resolved.is_dir():
        raise EvaluateError(f"--json {path} is a directory; give a file name")
    why = unwritable(path.parent)
    if why:  # found out now, not after an evaluation whose figures would be lost
        raise EvaluateError(f"cannot write {path}: {path.parent} {why}; give --json a file in a writable folder")
    return path


def _write(path: Path, result: dict) -> None:
    try:
        write_json_atomic(path, result)
    except OSError as err:  # checked before evaluating, yet a disk can fill up meanwhile
        raise EvaluateError(f"cannot write {path} ({err.strerror or err}); the table above has the figures") \
            from None


def table(result: dict) -> str:
    steps = result["steps"]
    shown = sorted({0, min(1, steps), steps})
    head = " | ".join(f"loss@{s}" for s in shown)
    acc = any("accuracy" in f for f in result["models"].values())
    if acc:
        head += " | " + " | ".join(f"accuracy@{s}" for s in shown)
    what = f"episodes from {result['episodes']}" if "episodes" in result else "test tasks"
    rates = result.get("learned_inner_lr", "fixed")
    rule = f"alpha {result['inner_lr']:g}" if rates == "fixed" else f"the run's learned inner rates ({rates})"
    lines = [f"{result['tasks']} {what}, {steps} adaptation step(s) of {result.get('algorithm', 'maml')}, {rule}",
             f"{'model':<10} | {head}"]
    for name, f in result["models"].items():
        row = " | ".join(f"{_number(f['loss'][s], '.4f'):>{len(f'loss@{s}')}}" for s in shown)
        if acc:
            row += " | " + " | ".join(_percent(f["accuracy"][s], f["accuracy_ci95"][s]) for s in shown)
        lines.append(f"{name:<10} | {row}")
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _percent(accuracy: Optional[float], ci95: Optional[float]) -> str:
    if accuracy is None:
        return "  n/a"
    return f"{100 * accuracy:5.1f}" + ("%" if ci95 is None else f" ± {100 * ci95:.1f}%")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="dif-maml-evaluate", description=plain(__doc__))
    ap.add_argument("run_dir", type=Path, help="a run directory (hydra.run.dir of a finished run)")
    ap.add_argument("--model", default="centroid", help="centroid (default), agent<k>, or all")
    ap.add_argument("--steps", type=int, help=f"adaptation steps: the curve covers 0..N, N <= {MAX_STEPS} "
                    f"(default: the run's own)")
    ap.add_argument("--tasks", type=int, help=f"test tasks, at most {MAX_TASKS} (default: the run's final test set)")
    ap.add_argument("--seed", type=int, help="seed of the test tasks, >= 0 (default: the run's)")
    ap.add_argument("--episodes", type=Path, help="your own episodes instead of the test split: DIR/<episode>/"
                    "{support,query}/<class>/<image> (sinusoid: DIR/<episode>.csv with columns split,x,y; "
                    "table_tasks: DIR/<episode>.csv with columns split and the run's features and target)")
    ap.add_argument("--json", help="where the figures go (default RUN_DIR/evaluation.json)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--data-root", help="the dataset's folder, if it is no longer where the run found it")
    ap.add_argument("--test-root", help="a shared test folder (data.test_root) to evaluate on, e.g. for a run whose "
                    "agents were tested on held-out tasks of their own data")
    args = ap.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.device, args.data_root, args.test_root)
        out_path = _json_path(run.dir, args.json)
        names = run.model_names if args.model == "all" else [args.model]
        if args.episodes is not None and (args.tasks is not None or args.seed is not None):
            raise EvaluateError("--episodes evaluates your own episodes: --tasks and --seed choose test-split tasks")
        result = run.evaluate(names, args.steps, args.tasks, args.seed, args.episodes)
        print(table(result))
        _write(out_path, result)
    except EvaluateError as err:
        print(f"dif_maml_dist.evaluate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"figures in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
