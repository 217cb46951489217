"""Use what a run learned: load its saved models, adapt them to new tasks, evaluate them.

Python API::

    run = dif_maml_dist.load_run("outputs/RUN")          # the run's config and models
    model = run.model("centroid")                          # or "agent3"
    adapted = model.adapt(x_support, y_support, steps=5)   # plain SGD with the run's inner step size
    predictions = adapted(x_query)                         # logits (classification) or predictions

Command line (also ``dif-maml-evaluate``)::

    python -m dif_maml_dist.evaluate RUN_DIR [--model centroid|agent<k>|all] [--steps N] [--tasks N] [--seed S]
        [--episodes DIR] [--json FILE] [--device cpu|cuda] [--data-root DIR]

prints loss (and accuracy with its 95% confidence half-width) after 0..N adaptation steps on test tasks of the
run's task family, and writes the same as JSON (default ``RUN_DIR/evaluation.json``; the run's own files are
never written). By default the test set is the run's own final one, so the figures are the run's final figures;
``--episodes DIR`` evaluates on your own few-shot episodes instead (``tasks/user_episodes.py`` has the layout).
Conv4 models use batch statistics, as in training: ``adapted(x)`` normalises with the statistics of ``x``.
A figure that is undefined (the 95% half-width of a single task, the loss of a diverged model) is ``None``
(``null`` in the JSON, left out of the table).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import Config
from .learner import Learner, concat_curves
from .maml import sgd_adaptation
from .metrics import Curves, figures, write_json_atomic
from .outputs import RUN_OWN_DIRS

EXIT_USAGE = 2
#: What a run writes itself: an evaluation never writes there.
RUN_OWN = ("summary.json", ".lock")
#: Bounds of an evaluation: the curves of every task are held in memory until the end and nothing reports
#: progress meanwhile, so past these an evaluation exhausts memory or runs for hours unseen.
MAX_TASKS, MAX_STEPS = 100_000, 1_000


class EvaluateError(ValueError):
    """A bad run directory, model name or option: one line, exit status 2."""


def plain(doc: str) -> str:
    """A docstring's first line as plain text, for ``--help`` (which prints RST markup literally)."""
    return doc.splitlines()[0].replace("``", "")


def unwritable(folder: Path) -> Optional[str]:
    """Why no file can be created in ``folder``, or None if one can. Tried rather than read off the permission
    bits, which say nothing for root, a read-only mount or /proc; the probe is an unnamed temporary file, so
    nothing is left behind either way."""
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    return None


def _device(spec: torch.device | str) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise EvaluateError(f"--device {spec} is not a device torch knows; use cpu or cuda (cuda:N for the N-th "
                            f"GPU)") from None
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise EvaluateError(f"--device {spec} but no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= visible:
            raise EvaluateError(f"--device {spec} but only {visible} CUDA device(s) are visible (cuda:0.."
                                f"cuda:{visible - 1})")
    elif device.type != "cpu":  # e.g. meta: no data to evaluate with; others untested with these models
        raise EvaluateError(f"--device {spec} cannot evaluate; use cpu or cuda")
    return device


def run_config(run_dir: Path) -> Config:
    """The config a run directory was made with (its summary's, else hydra's record)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import from_omegaconf

    summary, recorded = run_dir / "summary.json", run_dir / ".hydra" / "config.yaml"
    try:
        if summary.is_file():  # the config the run ended with (a resumed run may have changed its schedule)
            node = OmegaConf.create(json.loads(summary.read_text())["config"])
        elif recorded.is_file():
            node = OmegaConf.load(recorded)
        else:
            raise EvaluateError(f"{run_dir} holds no run: neither summary.json nor .hydra/config.yaml is there")
        return from_omegaconf(OmegaConf.merge(OmegaConf.structured(Config), node))
    except (OSError, KeyError, json.JSONDecodeError, OmegaConfBaseException) as err:
        raise EvaluateError(f"cannot read the run's config in {run_dir} ({str(err).splitlines()[0]})") from None


@dataclass
class AdaptedModel:
    """A model's parameters after adaptation: ``adapted(x)`` gives its outputs on ``x``."""

    learner: Learner
    params: list[Tensor]  #: one tensor per parameter, in the model's order (``learner.layout.names``)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.learner.model.first_order_forward(self.params, x.to(self.learner.device,
                                                                              self.learner.dtype))

    def named_parameters(self) -> dict[str, Tensor]:
        return dict(zip(self.learner.layout.names, self.params))


@dataclass
class SavedModel(AdaptedModel):
    """A model a run saved (``models/<name>.pt``): the launch model, before adaptation."""

    name: str = ""
    inner_lr: float = 0.0  #: the run's alpha

    def adapt(self, x_support: Tensor, y_support: Tensor, steps: int = 1,
              inner_lr: Optional[float] = None) -> AdaptedModel:
        """``steps`` plain SGD steps on one task's support data (the run's alpha unless ``inner_lr`` is given),
        exactly as the run's own evaluation adapts."""
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        learner = self.learner
        x, y = x_support.to(learner.device, learner.dtype), y_support.to(learner.device)
        if y.is_floating_point():
            y = y.to(learner.dtype)
        *_, last = sgd_adaptation(learner.model.first_order_forward, learner.family.criterion, self.params, x, y,
                                  self.inner_lr if inner_lr is None else inner_lr, steps)
        return AdaptedModel(learner, last)


class Run:
    """A finished run's directory: its config and its saved models."""

    def __init__(self, run_dir: Path | str, device: torch.device | str = "cpu", data_root: Optional[str] = None):
        self.dir = Path(run_dir)
        if self.dir.is_file():
            raise EvaluateError(f"{self.dir} is a file, not a run directory: give the folder the run wrote "
                                f"(its hydra.run.dir)")
        if not self.dir.is_dir():
            raise EvaluateError(f"run directory {self.dir} does not exist")
        self.device = _device(device)
        self.cfg = run_config(self.dir)
        if data_root is not None:
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, root=data_root))
        names = sorted(p.stem for p in (self.dir / "models").glob("*.pt"))
        if not names:
            raise EvaluateError(f"{self.dir} has no saved models (models/*.pt): the run has not finished, or ran "
                                f"with train.save_models=false")
        self.model_names = sorted(names, key=lambda n: (n != "centroid", len(n), n))
        self._learner: Optional[Learner] = None

    def learner(self, tasks: Optional[int] = None, seed: Optional[int] = None) -> Learner:
        """The run's task family and model on ``device``; test tasks: the run's final set, or ``tasks`` of them
        drawn from ``seed``."""
        if tasks is not None and tasks < 1:
            raise EvaluateError(f"--tasks must be at least 1, got {tasks}")
        if tasks is not None and tasks > MAX_TASKS:
            raise EvaluateError(f"--tasks must be at most {MAX_TASKS}, got {tasks} (every task's curve is held in "
                                f"memory); evaluate several --seed values instead")
        if seed is not None and seed < 0:
            raise EvaluateError(f"--seed must be a non-negative integer, got {seed}")
        if tasks is None and seed is None:
            if self._learner is None:
                self._learner = self._build(self.cfg)
            return self._learner
        t = self.cfg.task
        n = tasks if tasks is not None else (t.final_eval_tasks or t.eval_tasks)
        cfg = replace(self.cfg, seed=self.cfg.seed if seed is None else seed,
                      task=replace(t, final_eval_tasks=n, eval_tasks=min(t.eval_tasks, n)))
        return self._build(cfg)

    def _build(self, cfg: Config) -> Learner:
        try:
            return Learner.build(cfg, self.device, getattr(torch, cfg.train.dtype))
        except (FileNotFoundError, ValueError) as err:
            hint = " (give --data-root DIR if the dataset has moved)" if cfg.data.root else ""
            raise EvaluateError(f"cannot build the run's task family: {str(err).splitlines()[0]}{hint}") from None

    def model(self, name: str, learner: Optional[Learner] = None) -> SavedModel:
        """``centroid`` or ``agent<k>``, on the run's device."""
        if name not in self.model_names:
            raise EvaluateError(f"{self.dir} has no model {name!r}; it has: {', '.join(self.model_names)}")
        learner = learner or self.learner()
        path = self.dir / "models" / f"{name}.pt"
        try:
            named = torch.load(path, map_location=learner.device, weights_only=True)
        except Exception as err:
            raise EvaluateError(f"{path} is not a readable model file ({str(err).splitlines()[0]})") from None
        if set(named) != set(learner.layout.names):
            raise EvaluateError(f"{path} does not hold the run's {learner.model.kind} model (parameters differ)")
        params = [named[n].to(learner.device, learner.dtype) for n in learner.layout.names]
        return SavedModel(learner, params, name, self.cfg.maml.inner_lr)

    def evaluate(self, names: Sequence[str], steps: Optional[int] = None, tasks: Optional[int] = None,
                 seed: Optional[int] = None, episodes: Optional[Path] = None) -> dict:
        """Figures of each model after 0..``steps`` adaptation steps (default the run's final curve's length) on
        the test tasks (:meth:`learner`), or on the user's own ``episodes`` folder
        (``tasks.user_episodes``): mean loss, and with a metric mean accuracy and its 95% half-width over tasks."""
        steps = self.cfg.maml.final_adapt_steps if steps is None else steps
        if steps < 0:
            raise EvaluateError(f"--steps must be non-negative, got {steps}")
        if steps > MAX_STEPS:
            raise EvaluateError(f"--steps must be at most {MAX_STEPS}, got {steps} (MAML adapts in a few steps; "
                                f"a longer curve runs for hours without progress output)")
        learner = self.learner(tasks, seed)
        mine = None
        if episodes is not None:
            from .tasks.user_episodes import read_episodes

            classification = learner.family.metric is not None
            try:
                mine = read_episodes(episodes, learner.family, self.cfg.task.n_way if classification else None)
            except ValueError as err:
                raise EvaluateError(str(err)) from None
        out = {"run": str(self.dir), "steps": steps, "inner_lr": self.cfg.maml.inner_lr, "models": {}}
        out.update({"episodes": str(episodes), "tasks": len(mine), "episode_names": list(mine)} if mine is not None
                   else {"tasks": learner.num_tests(final=True), "seed": self.cfg.seed if seed is None else seed})
        for name in names:
            flat = learner.layout.join(self.model(name, learner).params)
            if mine is None:
                curves = learner.test_curves(flat, self.cfg.maml.inner_lr, steps, final=True)
            else:
                parts = [learner.curves_on(batch, flat, self.cfg.maml.inner_lr, steps) for batch in mine.values()]
                curves = concat_curves(parts, 0, learner.family.metric is not None)
            out["models"][name] = _defined(curves)
        return out


def _defined(curves: Curves) -> dict[str, list[Optional[float]]]:
    """:func:`figures` with the undefined ones None: NaN and infinity are not JSON. The spread of a single task
    (a std over one value: NaN, with a warning that is no news here) and a diverged loss become null."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"std\(\): degrees of freedom", UserWarning)
        figs = figures(curves)
    return {key: [v if math.isfinite(v) else None for v in values] for key, values in figs.items()}


def load_run(run_dir: Path | str, device: torch.device | str = "cpu", data_root: Optional[str] = None) -> Run:
    """A finished run, ready to evaluate or adapt its models (see the module docstring)."""
    return Run(run_dir, device, data_root)


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
    lines = [f"{result['tasks']} {what}, {steps} adaptation step(s), alpha {result['inner_lr']:g}",
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
                    "{support,query}/<class>/<image> (sinusoid: DIR/<episode>.csv with columns split,x,y)")
    ap.add_argument("--json", help="where the figures go (default RUN_DIR/evaluation.json)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--data-root", help="the dataset's folder, if it is no longer where the run found it")
    args = ap.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.device, args.data_root)
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
