"""What a kind of task provides: the task-family protocol, which the built-in families (sinusoid, Omniglot,
MiniImagenet, class folders, tables) implement and a user's own family implements too (``task=custom task._target_=pkg.module.Family``,
README "Your own problem").

A family is built once per process as ``Family(cfg, **task.args)`` (``cfg``: the run's
:class:`~dif_maml_dist.config.Config`), before any process group forms; a mistake in its data should be a
``ValueError`` from the constructor or from :meth:`TaskFamily.sampler`, which the runtime reports in one line.
Under torchrun a process builds the sampler of its own agent only, so a family that reads
``data_root(cfg.data, agent)`` there never opens another agent's files.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

from torch import Generator, Tensor, nn

from dif_maml_dist.learning.batch import TaskBatch


class TaskSet(Protocol):
    """A fixed list of tasks, handed out a slice at a time (a :class:`TaskBatch` is one)."""

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` as one batch (dim 0 = task): evaluation gathers a chunk at a time."""


class TaskSampler(Protocol):
    """One agent's stream of training tasks."""

    def sample(self, gen: Generator, num_tasks: int) -> TaskBatch:
        """``num_tasks`` fresh tasks, drawn from ``gen`` only (the agent's seeded stream: a resumed run draws the
        same tasks again, and the simulator the same as torchrun). Inputs as float tensors on the CPU; targets
        float (regression) or integer class labels 0..n_way-1 (classification)."""


@runtime_checkable
class TaskFamily(Protocol):
    """What the runtime needs from a kind of task. Members marked optional may be left out."""

    criterion: Callable[[Tensor, Tensor], Tensor]  #: per-task loss, ``criterion(prediction, target)`` -> scalar
    #: a figure reported beside the loss, e.g. accuracy ``metric(prediction, target)`` -> scalar; None: none
    metric: Optional[Callable[[Tensor, Tensor], Tensor]]
    eval_chunk: int  #: test tasks gathered and adapted at once in evaluation (on a CPU): bounds memory

    def build_model(self) -> nn.Module:
        """A fresh model of the family's default architecture (``model._target_`` replaces it). Its parameters
        are the meta-parameters; the runtime initialises them from the run's seed."""

    def sampler(self, agent: int, num_agents: int) -> TaskSampler:
        """Agent ``agent``'s (of ``num_agents``) training tasks. Called in the agent's own process under
        torchrun, so it should read this agent's data only."""

    def eval_set(self, seed: int, num_tasks: int) -> TaskSet:
        """Test tasks, identical in every process for a given seed; a smaller ``num_tasks`` gives a prefix of a
        larger one."""


#: The protocol's members, in the order a missing one is named.
REQUIRED_MEMBERS = ("criterion", "metric", "eval_chunk", "build_model", "sampler", "eval_set")
#: Members a family may add: ``held_out_set(agent, num_agents, seed, num_tasks)`` (each agent tested on held-out
#: tasks of its own data: :class:`HeldOutTasks`), ``val_set(seed, num_tasks)`` (train.validate=true),
#: ``image(path)`` (evaluate --episodes on a folder of the user's images) and ``episode(path)`` (evaluate
#: --episodes on the user's ``<episode>.csv`` files, read by the family itself as a one-task batch).
OPTIONAL_MEMBERS = ("held_out_set", "val_set", "image", "episode")


class HeldOutTasks(Protocol):
    """The optional member a family adds when its agents' data stays with them and no test folder is shared.

    With ``data.agent_root`` set and ``data.test_root`` not, the runtime tests each agent on held-out tasks of
    its own data, and the centroid on the union of equal shares of them (each process adapts the centroid on its
    own agent's share), so that no process reads another agent's files. The family must then keep these tasks
    out of :meth:`TaskFamily.sampler`'s training tasks (e.g. hold out some of the agent's classes or files).
    """

    def held_out_set(self, agent: int, num_agents: int, seed: int, num_tasks: int) -> TaskSet:
        """Agent ``agent``'s held-out test tasks, from its own data only; the same in every process for a given
        seed, and a smaller ``num_tasks`` gives a prefix of a larger one."""
