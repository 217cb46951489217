"""Task families. Each gives a model, a loss, per-agent seeded training samplers and one shared evaluation set.

``task_family(cfg)`` is the only place that maps ``task.name`` to code: the agent loop and the simulator see a
:class:`TaskFamily` and nothing task-specific.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Protocol

from torch import Tensor, nn

from ..maml import TaskBatch
from .omniglot import OmniglotFamily
from .sinusoid import SinusoidFamily, SinusoidTasks

if TYPE_CHECKING:
    from ..config import Config


class TaskSampler(Protocol):
    def sample(self, gen, num_tasks: int) -> TaskBatch: ...


class TaskFamily(Protocol):
    """What the runtime needs from a kind of task."""

    criterion: Callable[[Tensor, Tensor], Tensor]  #: per-task loss, ``criterion(prediction, target)``
    metric: Optional[Callable[[Tensor, Tensor], Tensor]]  #: e.g. accuracy ``metric(prediction, target)``; None
    eval_chunk: int  #: test tasks adapted at once (vmap) in evaluation: bounds memory

    def build_model(self) -> nn.Module: ...

    def sampler(self, agent: int, num_agents: int) -> TaskSampler: ...

    def eval_set(self, seed: int, num_tasks: int) -> TaskBatch:
        """Shared test tasks, identical on every agent; a smaller ``num_tasks`` gives a prefix of a larger one."""


FAMILIES = {"sinusoid": SinusoidFamily, "omniglot": OmniglotFamily}


def task_family(cfg: "Config") -> TaskFamily:
    if cfg.task.name not in FAMILIES:
        raise ValueError(f"unknown task {cfg.task.name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[cfg.task.name](cfg)


__all__ = ["FAMILIES", "OmniglotFamily", "SinusoidFamily", "SinusoidTasks", "TaskFamily", "TaskSampler", "task_family"]
