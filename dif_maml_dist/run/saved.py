"""A finished run's saved models, ready to use: load them, adapt them to new tasks, evaluate them (the Python API
behind ``dif_maml_dist.load_run`` and ``python -m dif_maml_dist.evaluate``)::

    run = dif_maml_dist.load_run("outputs/RUN")          # the run's config and models
    model = run.model("centroid")                          # or "agent3"
    adapted = model.adapt(x_support, y_support, steps=5)   # plain SGD with the run's inner step size
    predictions = adapted(x_query)                         # logits (classification) or predictions

Conv4 models use batch statistics, as in training: ``adapted(x)`` normalises with the statistics of ``x``. A
figure that is undefined (the 95% half-width of a single task, the loss of a diverged model) is ``None``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist.config import Config
from dif_maml_dist.engine.figures import Curves, figures
from dif_maml_dist.engine.learner import Learner, concat_curves
from dif_maml_dist.learning.adaptation import adapted_models
from dif_maml_dist.messages import first_line
from dif_maml_dist.run.validate import validate

#: Bounds of an evaluation: the curves of every task are held in memory until the end and nothing reports
#: progress meanwhile, so past these an evaluation exhausts memory or runs for hours unseen.
MAX_TASKS, MAX_STEPS = 100_000, 1_000


class EvaluateError(ValueError):
    """A bad run directory, model name or option: one line, exit status 2."""


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

    from dif_maml_dist.config import from_omegaconf

    summary, recorded = run_dir / "summary.json", run_dir / ".hydra" / "config.yaml"
    try:
        if summary.is_file():  # the config the run ended with (a resumed run may have changed its schedule)
            node = OmegaConf.create(json.loads(summary.read_text())["config"])
        elif recorded.is_file():
            node = OmegaConf.load(recorded)
        else:
            raise EvaluateError(f"{run_dir} holds no run: neither summary.json nor .hydra/config.yaml is there")
        return validate(from_omegaconf(OmegaConf.merge(OmegaConf.structured(Config), node)))
    except (OSError, KeyError, json.JSONDecodeError, OmegaConfBaseException) as err:
        raise EvaluateError(f"cannot read the run's config in {run_dir} ({first_line(err)})") from None


@dataclass
class AdaptedModel:
    """A model's parameters after adaptation: ``adapted(x)`` gives its outputs on ``x``."""

    learner: Learner
    params: list[Tensor]  #: one tensor per parameter, in the model's order (``learner.model.layout.names``)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.learner.model.first_order_forward(self.params, x.to(self.learner.device,
                                                                              self.learner.dtype))

    def named_parameters(self) -> dict[str, Tensor]:
        """The model's parameters by name (what its ``nn.Module`` loads with ``load_state_dict``)."""
        return dict(zip(self.learner.model.layout.names, self.params))


@dataclass
class SavedModel(AdaptedModel):
    """A model a run saved (``models/<name>.pt``): the launch model, before adaptation, and the run's algorithm's
    learned inner rates if it has any (``learning.adaptation``: they are saved with the model)."""

    name: str = ""
    rates: list[Tensor] = field(default_factory=list)  #: learned inner rates, in ``learner.layout``'s order

    @property
    def state(self) -> Tensor:
        """The flat state the run trained (``learner.layout``): the model's parameters, then the rates."""
        return self.learner.layout.join([*self.params, *self.rates])

    def adapt(self, x_support: Tensor, y_support: Tensor, steps: int = 1,
              inner_lr: Optional[float] = None) -> AdaptedModel:
        """``steps`` inner steps on one task's support data, exactly as the run's own evaluation adapts: the run's
        algorithm's inner rule (its alpha unless ``inner_lr`` is given; its learned rates if it learned them)."""
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        learner, rule = self.learner, self.learner.algorithm.inner
        if inner_lr is not None:
            if rule.rates != "fixed":
                raise ValueError(f"this run learned its inner rates ({rule.rates}): adapt without inner_lr, "
                                 f"which would replace them")
            rule = replace(rule, lr=inner_lr)
        x, y = x_support.to(learner.device, learner.dtype), y_support.to(learner.device)
        if y.is_floating_point():
            y = y.to(learner.dtype)
        *_, last = adapted_models(learner.losses.query_loss, rule, [*self.params, *self.rates], x, y, steps)
        return AdaptedModel(learner, list(last))


class Run:
    """A finished run's directory: its config and its saved models."""

    def __init__(self, run_dir: Path | str, device: torch.device | str = "cpu", data_root: Optional[str] = None,
                 test_root: Optional[str] = None):
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
        if test_root is not None:
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, test_root=test_root))
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
            raise EvaluateError(f"cannot build the run's task family: {first_line(err)}{hint}") from None

    def model(self, name: str, learner: Optional[Learner] = None) -> SavedModel:
        """``centroid`` or ``agent<k>``, on the run's device."""
        if name not in self.model_names:
            raise EvaluateError(f"{self.dir} has no model {name!r}; it has: {', '.join(self.model_names)}")
        learner = learner or self.learner()
        path = self.dir / "models" / f"{name}.pt"
        try:
            named = torch.load(path, map_location=learner.device, weights_only=True)
        except Exception as err:
            raise EvaluateError(f"{path} is not a readable model file ({first_line(err)})") from None
        if set(named) != set(learner.layout.names):
            raise EvaluateError(f"{path} does not hold the run's {learner.model.kind} model (parameters differ)")
        params = [named[n].to(learner.device, learner.dtype) for n in learner.layout.names]
        n = len(learner.model.layout.names)
        return SavedModel(learner, params[:n], name, params[n:])

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
        if episodes is None and learner.held_out_per_agent:
            raise EvaluateError(f"{self.dir} tested each agent on held-out tasks of its own data (data.agent_root, no "
                                f"data.test_root), which stay with the agents: give --test-root DIR (test classes or "
                                f"files in the run's layout) or --episodes DIR")
        if episodes is not None:
            from dif_maml_dist.tasks.user_episodes import read_episodes

            classification = learner.family.metric is not None
            try:
                mine = read_episodes(episodes, learner.family, self.cfg.task.n_way if classification else None)
            except ValueError as err:
                raise EvaluateError(str(err)) from None
        rule = learner.algorithm.inner
        out = {"run": str(self.dir), "steps": steps, "algorithm": learner.algorithm.name, "inner_lr": rule.lr,
               "learned_inner_lr": rule.rates, "models": {}}
        out.update({"episodes": str(episodes), "tasks": len(mine), "episode_names": list(mine)} if mine is not None
                   else {"tasks": learner.num_tests(final=True), "seed": self.cfg.seed if seed is None else seed})
        for name in names:
            flat = self.model(name, learner).state
            if mine is None:
                curves = learner.test_curves(flat, steps, final=True)
            else:
                parts = [learner.curves_on(batch, flat, steps) for batch in mine.values()]
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


def load_run(run_dir: Path | str, device: torch.device | str = "cpu", data_root: Optional[str] = None,
             test_root: Optional[str] = None) -> Run:
    """A finished run, ready to evaluate or adapt its models (see the module docstring); ``data_root``: the shared
    dataset's folder if it has moved; ``test_root``: a shared test folder (``data.test_root``) to evaluate on."""
    return Run(run_dir, device, data_root, test_root)
