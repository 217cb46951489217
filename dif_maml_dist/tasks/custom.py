"""A user's own task family and model, named on the command line (``task._target_``, ``model._target_``) and
checked against the protocol before anything runs; and each agent's own data folder (``data.agent_root``)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dif_maml_dist.config import Config, DataConfig
from dif_maml_dist.learning.batch import TaskBatch
from dif_maml_dist.messages import first_line
from dif_maml_dist.tasks.protocol import REQUIRED_MEMBERS, TaskFamily


class AgentDataError(ValueError):
    """A mistake in one agent's own data: under torchrun only that agent's process meets it, so that process says
    it at once (a mistake every process meets alike is said by rank 0)."""


def import_target(target: str, key: str) -> Any:
    """The object ``package.module.Name`` names (``ValueError`` naming ``key`` when it does not import)."""
    module_name, _, name = target.rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={target} must be a dotted path package.module.Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}={target} does not import ({err}); install the package that holds it, or add its "
                         f"folder to PYTHONPATH on every node") from None
    except Exception as err:  # noqa: BLE001 (the user's module raised while importing: say what, in one line)
        raise ValueError(f"{key}={target}: importing {module_name} raised {type(err).__name__}: "
                         f"{first_line(err)}") from None
    if not hasattr(module, name):
        raise ValueError(f"{key}={target}: module {module_name} has no {name}")
    return getattr(module, name)


def custom_family(cfg: Config) -> TaskFamily:
    """``Class(cfg, **task.args)`` for ``task._target_``, checked to have every member of the protocol."""
    target = cfg.task._target_
    assert target is not None
    cls = import_target(target, "task._target_")
    try:
        family = cls(cfg, **cfg.task.args)
    except TypeError as err:
        raise ValueError(f"task._target_={target}: {cls.__name__}(cfg, **task.args) failed: {err}") from None
    missing = [m for m in REQUIRED_MEMBERS if not hasattr(family, m)]
    if missing:
        raise ValueError(f"task._target_={target}: {cls.__name__} lacks {', '.join(missing)} of the task-family "
                         f"protocol (dif_maml_dist.tasks.protocol.TaskFamily)")
    return family


class WithModel:
    """A family whose model is the user's ``model._target_`` instead of its own: every other member is the
    family's."""

    def __init__(self, family: TaskFamily, build: Callable[[], nn.Module]):
        self._family, self._build = family, build

    def build_model(self) -> nn.Module:
        return self._build()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)


def custom_model(cfg: Config) -> Callable[[], nn.Module]:
    """A builder of ``model._target_(**model.args)``, checked once here (it must build an ``nn.Module`` with
    parameters)."""
    target = cfg.model._target_
    assert target is not None
    cls = import_target(target, "model._target_")

    def build() -> nn.Module:
        try:
            model = cls(**cfg.model.args)
        except TypeError as err:
            raise ValueError(f"model._target_={target}: {getattr(cls, '__name__', target)}(**model.args) failed: "
                             f"{err}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model._target_={target} built a {type(model).__name__}, not a torch.nn.Module")
        if not any(True for _ in model.parameters()):
            raise ValueError(f"model._target_={target} has no parameters to meta-learn")
        return model

    build()
    return build


def agent_root(data: DataConfig, agent: int) -> Path:
    """Agent ``agent``'s own data folder: ``data.agent_root`` with ``{agent}`` replaced by its id. ``ValueError``
    naming the agent and the path when it is not a readable, non-empty folder."""
    if data.agent_root is None:
        raise ValueError("this task reads each agent's own data: set data.agent_root=DIR (e.g. /data/site{agent}: "
                         "{agent} becomes the agent's id)")
    root = Path(data.agent_root.replace("{agent}", str(agent))).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise AgentDataError(f"agent {agent}: data folder {root} {what} (data.agent_root={data.agent_root})")
    try:
        next(root.iterdir())
    except StopIteration:
        raise AgentDataError(f"agent {agent}: data folder {root} is empty (data.agent_root={data.agent_root})") from None
    except OSError as err:
        raise AgentDataError(f"agent {agent}: data folder {root} cannot be read ({err.strerror}; "
                         f"data.agent_root={data.agent_root})") from None
    return root


def check_model(cfg: Config, family: TaskFamily, batch: TaskBatch) -> None:
    """The family's model (or ``model._target_``) on one task's support set: a regressor's output must have the
    targets' shape, a classifier must give ``task.n_way`` scores per example, and the family's criterion must
    give a scalar (``ValueError``)."""
    from dif_maml_dist.learning.functional import functional

    model = functional(family.build_model())
    x, y = batch.support_x[0], batch.support_y[0]
    which = f"model._target_={cfg.model._target_}" if cfg.model._target_ else "the task family's model"
    try:
        with torch.no_grad():
            out = model.forward(tuple(p.detach() for p in model.module.parameters()), x.float())
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(f"{which} does not fit the task: on a support set of shape {tuple(x.shape)} it raised "
                         f"{type(err).__name__}: {first_line(err)}") from None
    if y.is_floating_point() and out.shape != y.shape:  # mse_loss would broadcast [N, 2] against [N, 1]
        raise ValueError(f"{which} does not fit the task: it gives outputs of shape {tuple(out.shape)} for targets "
                         f"of shape {tuple(y.shape)}")
    if not y.is_floating_point() and (out.dim() != y.dim() + 1 or out.shape[-1] != cfg.task.n_way):
        raise ValueError(f"{which} gives {out.shape[-1]} scores per example, but the tasks are {cfg.task.n_way}-way "
                         f"(task.n_way): make its last layer {cfg.task.n_way} wide")
    loss = family.criterion(out, y)
    if loss.dim() != 0:
        raise ValueError(f"the task family's criterion gives a {tuple(loss.shape)} tensor, not a scalar loss")
