"""Sinusoid regression (Finn et al. 2017; Dif-MAML appendix D): y = A sin(x - phase).

Agent k of K draws amplitudes from the k-th of K equal slices of [amplitude_min, amplitude_max]; phases and
inputs are shared ranges. Support and query points are drawn independently. Samples are generated on the CPU
in float64 from the caller's generator and then cast, so the task stream is the same whatever the dtype or
device of the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import Config, TaskConfig
from dif_maml_dist.learning.batch import TaskBatch
from dif_maml_dist.learning.models import MLP


class SinusoidTasks:
    """Task sampler for one agent (or the full range, for evaluation)."""

    def __init__(self, cfg: TaskConfig, agent: int | None = None, num_agents: int = 1):
        self.cfg = cfg
        lo, hi = cfg.amplitude_min, cfg.amplitude_max
        if agent is None:
            self.amplitude_range = (lo, hi)
        else:
            if not 0 <= agent < num_agents:
                raise ValueError(f"agent {agent} out of range for {num_agents} agents")
            width = (hi - lo) / num_agents
            self.amplitude_range = (lo + agent * width, lo + (agent + 1) * width)

    def _uniforms(self, gen: torch.Generator, num_tasks: int) -> torch.Tensor:
        # One draw per call (amplitude, phase, support x, query x for every task): fewer kernel launches,
        # which matters when the simulator samples for a thousand agents per iteration.
        return torch.rand(num_tasks, 2 + self.cfg.num_support + self.cfg.num_query, 1, generator=gen,
                          dtype=torch.float64)

    def _tasks(self, u: torch.Tensor, lo, hi) -> TaskBatch:
        """Tasks from uniforms ``u`` ``[..., tasks, 2 + points, 1]`` and amplitude bounds broadcastable to it."""
        c, ns = self.cfg, self.cfg.num_support
        amp = lo + (hi - lo) * u[..., :1, :]
        phase = c.phase_min + (c.phase_max - c.phase_min) * u[..., 1:2, :]
        x = c.x_min + (c.x_max - c.x_min) * u[..., 2:, :]
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[..., :ns, :], y[..., :ns, :], x[..., ns:, :], y[..., ns:, :])

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        return self._tasks(self._uniforms(gen, num_tasks), *self.amplitude_range)

    @staticmethod
    def sample_agents(samplers: "list[SinusoidTasks]", gens: list[torch.Generator], num_tasks: int) -> TaskBatch:
        """Every agent's :meth:`sample` stacked, ``[agents, tasks, ...]``: each agent draws from its own generator
        as ``sample`` does, and the draws are turned into tasks in one pass for all agents (the simulator
        samples for a thousand agents per iteration)."""
        u = torch.stack([s._uniforms(g, num_tasks) for s, g in zip(samplers, gens)])
        bounds = torch.tensor([s.amplitude_range for s in samplers], dtype=torch.float64).view(-1, 2, 1, 1, 1)
        return samplers[0]._tasks(u, bounds[:, 0], bounds[:, 1])

    @staticmethod
    def eval_set(cfg: TaskConfig, seed: int, num_tasks: int | None = None) -> TaskBatch:
        """The shared test tasks over the full amplitude range: identical on every agent for a given seed (a
        smaller ``num_tasks`` gives a prefix of a larger one)."""
        return SinusoidTasks(cfg).sample(seeding.generator(seed, seeding.Stream.EVAL), num_tasks or cfg.eval_tasks)


class SinusoidFamily:
    """The sinusoid task family: a ReLU MLP (1 -> model.hidden -> 1) under MSE."""

    reads_agent_data = False  #: draws its tasks, reads no data
    criterion = staticmethod(F.mse_loss)
    metric = None  #: regression: the loss is the figure
    eval_chunk = 1000

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self) -> MLP:
        return MLP(1, self.cfg.model.hidden, 1)

    def sampler(self, agent: int, num_agents: int) -> SinusoidTasks:
        return SinusoidTasks(self.cfg.task, agent, num_agents)

    def eval_set(self, seed: int, num_tasks: int) -> TaskBatch:
        return SinusoidTasks.eval_set(self.cfg.task, seed, num_tasks)
