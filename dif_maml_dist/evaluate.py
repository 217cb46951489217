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
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import Config
from .learner import Learner, concat_curves
from .maml import sgd_adaptation
from .metrics import figures, write_json_atomic
from .outputs import RUN_OWN_DIRS

EXIT_USAGE = 2
#: What a run writes itself: an evaluation never writes there.
RUN_OWN = ("summary.json", ".lock")


class EvaluateError(ValueError):
    """A bad run directory, model name or option: one line, exit status 2."""


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
        if not self.dir.is_dir():
            raise EvaluateError(f"run directory {self.dir} does not exist")
        self.cfg = run_config(self.dir)
        if data_root is not None:
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, root=data_root))
        self.device = torch.device(device)
        names = sorted(p.stem for p in (self.dir / "models").glob("*.pt"))
        if not names:
            raise EvaluateError(f"{self.dir} has no saved models (models/*.pt): the run has not finished, or ran "
                                f"with train.save_models=false")
        self.model_names = sorted(names, key=lambda n: (n != "centroid", len(n), n))
        self._learner: Optional[Learner] = None

    def learner(self, tasks: Optional[int] = None, seed: Optional[int] = None) -> Learner:
        """The run's task family and model on ``device``; test tasks: the run's final set, or ``tasks`` of them
        drawn from ``seed``."""
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
            out["models"][name] = figures(curves)
        return out


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
    return path


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
        row = " | ".join(f"{f['loss'][s]:>{len(f'loss@{s}')}.4f}" for s in shown)
        if acc:
            row += " | " + " | ".join(f"{100 * f['accuracy'][s]:5.1f} ± {100 * f['accuracy_ci95'][s]:.1f}%"
                                      for s in shown)
        lines.append(f"{name:<10} | {row}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="dif-maml-evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory (hydra.run.dir of a finished run)")
    ap.add_argument("--model", default="centroid", help="centroid (default), agent<k>, or all")
    ap.add_argument("--steps", type=int, help="adaptation steps: the curve covers 0..N (default: the run's own)")
    ap.add_argument("--tasks", type=int, help="test tasks (default: the run's final test set)")
    ap.add_argument("--seed", type=int, help="seed of the test tasks (default: the run's)")
    ap.add_argument("--episodes", type=Path, help="your own episodes instead of the test split: DIR/<episode>/"
                    "{support,query}/<class>/<image> (sinusoid: DIR/<episode>.csv with columns split,x,y)")
    ap.add_argument("--json", help="where the figures go (default RUN_DIR/evaluation.json)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--data-root", help="the dataset's folder, if it is no longer where the run found it")
    args = ap.parse_args(argv)
    try:
        if args.tasks is not None and args.tasks < 1:
            raise EvaluateError(f"--tasks must be at least 1, got {args.tasks}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise EvaluateError("--device cuda but no CUDA device is visible; use --device cpu")
        run = load_run(args.run_dir, args.device, args.data_root)
        out_path = _json_path(run.dir, args.json)
        names = run.model_names if args.model == "all" else [args.model]
        if args.episodes is not None and (args.tasks is not None or args.seed is not None):
            raise EvaluateError("--episodes evaluates your own episodes: --tasks and --seed choose test-split tasks")
        result = run.evaluate(names, args.steps, args.tasks, args.seed, args.episodes)
    except EvaluateError as err:
        print(f"dif_maml_dist.evaluate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(table(result))
    write_json_atomic(out_path, result)
    print(f"figures in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
