"""Task families. Each gives a model, a loss, per-agent seeded training samplers and one shared evaluation set.

``task_family(cfg)`` is the only place that maps ``task.name`` to code: the agent loop and the simulator see a
:class:`TaskFamily` and nothing task-specific.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Protocol

from torch import Tensor, nn

from dif_maml_dist.learning.maml import TaskBatch
from dif_maml_dist.tasks.miniimagenet import MiniImagenetFamily
from dif_maml_dist.tasks.omniglot import OmniglotFamily
from dif_maml_dist.tasks.sinusoid import SinusoidFamily, SinusoidTasks

if TYPE_CHECKING:
    from dif_maml_dist.config import Config


class TaskSet(Protocol):
    """A fixed list of tasks, handed out a slice at a time (a :class:`TaskBatch` is one)."""

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> TaskBatch: ...


class TaskSampler(Protocol):
    def sample(self, gen, num_tasks: int) -> TaskBatch: ...


class TaskFamily(Protocol):
    """What the runtime needs from a kind of task."""

    criterion: Callable[[Tensor, Tensor], Tensor]  #: per-task loss, ``criterion(prediction, target)``
    metric: Optional[Callable[[Tensor, Tensor], Tensor]]  #: e.g. accuracy ``metric(prediction, target)``; None
    eval_chunk: int  #: test tasks gathered and adapted at once (vmap) in evaluation: bounds memory

    def build_model(self) -> nn.Module: ...

    def sampler(self, agent: int, num_agents: int) -> TaskSampler: ...

    def eval_set(self, seed: int, num_tasks: int) -> TaskSet:
        """Shared test tasks, identical on every agent; a smaller ``num_tasks`` gives a prefix of a larger one."""


FAMILIES = {"sinusoid": SinusoidFamily, "omniglot": OmniglotFamily, "miniimagenet": MiniImagenetFamily}


def task_family(cfg: "Config") -> TaskFamily:
    if cfg.task.name not in FAMILIES:
        raise ValueError(f"unknown task {cfg.task.name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[cfg.task.name](cfg)


def check_task_data(cfg: "Config", num_agents: int, family: Optional[TaskFamily] = None) -> None:
    """Raise ``ValueError`` now if the dataset cannot serve the configured episodes to every agent and the test set
    (missing files, too few classes for N-way, too few images for K + Q): called before any process group or run
    directory exists. Decodes the dataset into its cache on first use (``family``: check this one, if built)."""
    family = family or task_family(cfg)
    for agent in range(num_agents):
        family.sampler(agent, num_agents)
    family.eval_set(cfg.seed, 1)


__all__ = ["FAMILIES", "MiniImagenetFamily", "OmniglotFamily", "SinusoidFamily", "SinusoidTasks", "TaskFamily",
           "TaskSampler", "TaskSet", "check_task_data", "task_family"]
