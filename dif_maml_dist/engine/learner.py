"""A task family bound to a device and dtype: the model as pure functions, its losses, and the shared test tasks;
what an agent (or the simulator) trains and evaluates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist.config import Config
from dif_maml_dist.engine.figures import Curves
from dif_maml_dist.learning.adaptation import adaptation_curves, adaptation_curves_loop
from dif_maml_dist.learning.algorithms import Algorithm, build_algorithm, choose_path
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.functional import FunctionalModel, functional
from dif_maml_dist.tasks import TaskFamily, TaskSet, held_out_set, task_family, tests_held_out_per_agent

#: A GPU holds this many times the CPU's test tasks in flight (the task families' ``eval_chunk`` is a CPU figure).
GPU_EVAL_CHUNK_FACTOR = 8


def concat_curves(parts: list[Curves], dim: int, with_metric: bool) -> Curves:
    """Curves of consecutive task slices as one (tasks along ``dim``)."""
    losses = torch.cat([p[0] for p in parts], dim=dim)
    return losses, torch.cat([p[1] for p in parts], dim=dim) if with_metric else None


def held_out_share(tasks: int, agent: int, num_agents: int) -> int:
    """How many of ``tasks`` centroid test tasks are agent ``agent``'s held-out tasks: the union takes task j from
    agent ``j % num_agents`` (:func:`interleave_by_agent`), so a longer union extends every share."""
    return tasks // num_agents + (1 if agent < tasks % num_agents else 0)


def interleave_by_agent(parts: Sequence[Curves], with_metric: bool) -> Curves:
    """The centroid's curves on the union of the agents' held-out shares (``parts[a]``: on agent a's first
    :func:`held_out_share` tasks), task j being agent ``j % len(parts)``'s: the first n tasks of a union of N
    are the union of n, as a shared test set's prefix is, so the periodic figures are the final ones' head."""
    order = sorted((i, a) for a, p in enumerate(parts) for i in range(p[0].shape[0]))
    losses = torch.stack([parts[a][0][i] for i, a in order])
    return losses, torch.stack([parts[a][1][i] for i, a in order]) if with_metric else None


def eval_chunk_for(configured: Optional[int], family_chunk: int, device: torch.device) -> int:
    """Test tasks in flight in evaluation: ``runtime.eval_chunk`` if given, else the family's CPU figure, scaled
    up on a GPU."""
    if configured is not None:
        return configured
    return family_chunk * (GPU_EVAL_CHUNK_FACTOR if device.type == "cuda" else 1)


def _on(tests: TaskSet, device: torch.device, dtype: torch.dtype) -> TaskSet:
    # A TaskBatch is small enough to live on the device for the whole run; an EpisodeSet gathers lazily.
    return tests.to(device, dtype) if isinstance(tests, TaskBatch) else tests


@dataclass
class Learner:
    """A task family bound to a device and dtype: what an agent (or the simulator) trains and evaluates."""

    family: TaskFamily
    model: FunctionalModel
    algorithm: Algorithm  #: maml.algorithm: the meta-gradient, and how a task adapts (in training and tests)
    losses: Losses  #: the model's loss in the forms the meta-gradient paths and adaptation use
    #: the shared test tasks of the final figures (TaskBatch on the device, or a lazy EpisodeSet); None when each
    #: agent is tested on its own held-out tasks (``held_out``)
    tests: Optional[TaskSet]
    eval_tasks: int  #: the first eval_tasks of the test tasks are evaluated during training
    device: torch.device
    dtype: torch.dtype
    eval_chunk: int  #: test tasks gathered and adapted at once (``runtime.eval_chunk``, by device by default)
    validation: Optional[TaskSet] = None  #: with train.validate: task.eval_tasks tasks of the validation characters
    #: agent -> its held-out test tasks (``tasks.tests_held_out_per_agent``), for the agents this process tests
    held_out: dict[int, TaskSet] = field(default_factory=dict)
    num_agents: int = 1  #: how many agents share the centroid's held-out test tasks

    @property
    def layout(self) -> FlatLayout:
        """The agent's state: the model's parameters, then the algorithm's learned inner rates if it has any."""
        return self.algorithm.inner.layout

    @classmethod
    def build(cls, cfg: Config, device: torch.device, dtype: torch.dtype, family: Optional[TaskFamily] = None,
              agents: Sequence[int] = (), num_agents: int = 1) -> "Learner":
        """``family``: the task family, if the caller has built it already (building one may load a dataset).
        ``agents`` (of ``num_agents``): whose held-out test tasks this process loads when each agent is tested on
        its own (its own agent's under torchrun, so that it reads no other agent's data)."""
        family = family or task_family(cfg)
        model = functional(family.build_model().to(device=device, dtype=dtype))
        algorithm = build_algorithm(cfg.maml, model.layout)
        t = cfg.task
        # One seeded stream: the periodic test set is the first eval_tasks tasks of the final one.
        n = max(t.final_eval_tasks or t.eval_tasks, t.eval_tasks)
        if tests_held_out_per_agent(cfg):
            tests, held_out = None, {a: _on(held_out_set(cfg, family, a, num_agents, n), device, dtype)
                                     for a in agents}
        else:
            tests, held_out = _on(family.eval_set(cfg.seed, n), device, dtype), {}
        crit = family.criterion
        chunk = eval_chunk_for(cfg.runtime.eval_chunk, family.eval_chunk, device)
        validation = family.val_set(cfg.seed, t.eval_tasks) if cfg.train.validate else None
        losses = Losses(make_loss(model.forward, crit), make_loss(model.first_order_forward, crit),
                        make_loss(model.batched_forward, crit))
        return cls(family, model, algorithm, losses, tests, t.eval_tasks, device, dtype, chunk, validation, held_out,
                   num_agents)

    @property
    def eval_path(self) -> str:
        """How test tasks are adapted: vmap over a chunk of tasks, or one task at a time (the same choice as the
        meta-gradient's ``auto``, at the chunk size)."""
        return choose_path("auto", self.model.kind, self.eval_chunk)

    @property
    def held_out_per_agent(self) -> bool:
        """Whether each agent is tested on held-out tasks of its own data (no shared test set)."""
        return self.tests is None

    def num_tests(self, final: bool, validation: bool = False, agent: Optional[int] = None) -> int:
        """How many tasks an evaluation adapts: the periodic test prefix, the final test set (or ``agent``'s
        held-out tasks), or the validation tasks."""
        if validation:
            assert self.validation is not None, "train.validate is off"
            return len(self.validation)
        return len(self._tasks(agent)) if final else self.eval_tasks

    def _tasks(self, agent: Optional[int]) -> TaskSet:
        if self.tests is not None:
            return self.tests
        assert agent in self.held_out, f"agent {agent}'s held-out tasks are not loaded in this process"
        return self.held_out[agent]

    def curves(self, params: Tensor, max_steps: int, start: int, stop: int,
               over_agents: bool = False, validation: bool = False, agent: Optional[int] = None) -> Curves:
        """Per-task test loss (and metric) after 0..max_steps adaptation steps (the algorithm's inner rule) on
        test tasks ``start:stop`` (the shared ones, ``agent``'s held-out ones, or validation tasks): ``[tasks,
        max_steps+1]``, or ``[agents, tasks, max_steps+1]`` for stacked ``[agents, P]`` params (``over_agents``)."""
        tasks = self.validation if validation else self._tasks(agent)
        if over_agents and self.eval_path == "loop":
            parts = [self.curves(p, max_steps, start, stop, validation=validation, agent=agent)
                     for p in params]
            return (torch.stack([p[0] for p in parts]),
                    None if self.family.metric is None else torch.stack([p[1] for p in parts]))
        chunk, parts = self.eval_chunk, []
        if over_agents:  # the vmap holds agents x tasks adapted models at once: keep that product bounded
            chunk = max(1, chunk // params.shape[0])
        if start >= stop:  # more ranks than test tasks: this one has none
            empty = params.new_zeros((*params.shape[:-1], 0, max_steps + 1))
            return empty, (empty if self.family.metric is not None else None)
        for i in range(start, stop, chunk):  # gathered a chunk at a time: see tasks.episodes.EpisodeSet
            parts.append(self.curves_on(tasks.slice(i, min(i + chunk, stop)), params, max_steps, over_agents, chunk))
        return concat_curves(parts, 1 if over_agents else 0, self.family.metric is not None)

    def curves_on(self, batch: TaskBatch, params: Tensor, max_steps: int, over_agents: bool = False,
                  chunk: Optional[int] = None) -> Curves:
        """:meth:`curves` on any tasks of this family (e.g. a user's own episodes), held in memory."""
        batch, views, fam = batch.to_device(self.device, self.dtype), self.layout.split(params), self.family
        rule = self.algorithm.inner
        if self.eval_path == "loop":
            return adaptation_curves_loop(self.model.first_order_forward, fam.criterion, rule, views, batch,
                                          max_steps, fam.metric)
        return adaptation_curves(self.model.batched_forward, fam.criterion, rule, views, batch, max_steps,
                                 fam.metric, chunk=chunk or self.eval_chunk, over_agents=over_agents)

    def test_curves(self, params: Tensor, max_steps: int, final: bool = False,
                    over_agents: bool = False, agent: Optional[int] = None) -> Curves:
        """:meth:`curves` over the whole periodic test set, or (``final``) the final one: the shared one, or
        ``agent``'s held-out tasks when each agent is tested on its own."""
        return self.curves(params, max_steps, 0, self.num_tests(final, agent=agent), over_agents,
                           agent=agent)

    def held_out_share_curves(self, params: Tensor, max_steps: int, final: bool, agent: int) -> Curves:
        """The centroid's curves on agent ``agent``'s share of the union of held-out tasks it is tested on
        (:func:`interleave_by_agent` puts the shares together)."""
        share = held_out_share(self.num_tests(final, agent=agent), agent, self.num_agents)
        return self.curves(params, max_steps, 0, share, agent=agent)
