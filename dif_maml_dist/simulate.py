"""All K agents in one process, in lock-step, with the dense combination matrix.

The numerical reference for the distributed runtime and the tool for large-K studies. It uses the runtime's
own building blocks (per-agent seeded task samplers, MAML functions, optimizers, initialisation), and runs
through the same schedule (:func:`~dif_maml_dist.loop.run_loop`), so its outputs have the runtime's format.

Two engines:

- ``per_agent`` (``simulate.vectorize=false``): K :class:`~dif_maml_dist.agent.Agent` objects; each adapts with
  exactly the runtime's code, then each combines with the runtime's :func:`~dif_maml_dist.combine.combine`
  (same terms, same order). Dif-MAML and non-cooperative runs equal the torchrun processes bit for bit.
- ``vectorized`` (default): one ``[K, P]`` parameter tensor; the meta-gradients of all agents in one
  ``vmap`` over agents, one optimizer step over the stack (Adam and SGD are elementwise, so this is K local
  optimizers), and ``W = A^T Phi`` as one (sparse, for sparse graphs) matrix product. Equal to the runtime up
  to floating-point summation order (~1e-15 relative per step in float64).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import seeding
from .agent import Agent, initial_params, make_optimizer
from .combine import combine
from .config import Config
from .learner import Learner
from .maml import TaskBatch, batched_meta_gradient
from .metrics import Curves
from .topology import combine_plan
from .transport import ring_all_reduce_bytes

#: Below this density a sparse matrix product is used for the combine (large, sparse graphs).
_SPARSE_BELOW = 0.25
#: Agents per vmap call in the vectorised engine (measured: 250 agents per call beat 1000 and 50 on a 2-core CPU).
_AGENT_CHUNK = 256
#: Agents per evaluation call: their vmap shares the family's ``eval_chunk`` budget of adapted models in flight.
_EVAL_AGENT_CHUNK = 8


def sample_agents(samplers: Sequence[Any], gens: Sequence[torch.Generator], num_tasks: int) -> TaskBatch:
    """Every agent's task batch from its own sampler and stream, stacked ``[agents, tasks, ...]``: in one pass
    where the samplers offer it (``sample_agents``), else agent by agent."""
    vectorized = getattr(type(samplers[0]), "sample_agents", None)
    if vectorized is not None and all(type(s) is type(samplers[0]) for s in samplers):
        return vectorized(list(samplers), list(gens), num_tasks)
    batches = [s.sample(g, num_tasks) for s, g in zip(samplers, gens)]
    return TaskBatch(*(torch.stack(parts) for parts in zip(*(b.tensors() for b in batches))))


def nominal_bytes_per_iteration(strategy: str, weights: np.ndarray, agent: int, message_bytes: int) -> int:
    """What the torchrun runtime sends per iteration for this agent (the simulator sends nothing itself)."""
    k = weights.shape[0]
    if strategy == "dif_maml":
        return combine_plan(weights, agent).degree * message_bytes
    if strategy == "centralized":
        return ring_all_reduce_bytes(k, message_bytes)
    return 0


class Simulation:
    """K agents in lock-step; also the :class:`~dif_maml_dist.loop.Cohort` the simulator mode runs."""

    is_root = True

    def __init__(self, cfg: Config, weights: np.ndarray, device: torch.device | str = "cpu", vectorize: bool = True):
        self.cfg, self.weights = cfg, np.asarray(weights, dtype=np.float64)
        k = self.weights.shape[0]
        self.num_agents, self.agent_ids = k, tuple(range(k))
        self.device, self.dtype = torch.device(device), getattr(torch, cfg.train.dtype)
        self.vectorize = vectorize
        self.learner = Learner.build(cfg, self.device, self.dtype)
        self.layout = self.learner.layout
        self.compute_seconds = self.exchange_seconds = 0.0
        self._iteration = 0
        msg = self.layout.numel * torch.empty((), dtype=self.dtype).element_size()
        self._bytes_per_iter = [nominal_bytes_per_iteration(cfg.strategy.name, self.weights, a, msg) for a in range(k)]
        if vectorize:
            self.params = torch.stack([initial_params(cfg, a, self.dtype, self.device, self.learner.family)
                                       for a in range(k)])
            self.optimizer = make_optimizer(cfg.optim, self.params)
            self.tasks = [self.learner.family.sampler(a, k) for a in range(k)]
            self.rngs = [seeding.generator(cfg.seed, seeding.TASKS, a) for a in range(k)]
            m = cfg.maml
            self._meta_gradients = torch.vmap(batched_meta_gradient(self.learner.batched_loss, m.inner_lr,
                                                                    m.inner_steps, m.first_order, m.vmap_chunk))
            a_t = torch.as_tensor(self.weights.T, dtype=self.dtype, device=self.device)
            density = np.count_nonzero(self.weights) / self.weights.size
            if density < _SPARSE_BELOW and self.device.type == "cpu":
                with warnings.catch_warnings():  # "sparse CSR support is in beta": a plain product is all we use
                    warnings.simplefilter("ignore", UserWarning)
                    self._mix = a_t.to_sparse_csr()
            else:
                self._mix = a_t
        else:
            self.agents = [Agent(cfg, a, k, combiner=None, device=self.device, learner=self.learner) for a in range(k)]
            self.plans = [combine_plan(self.weights, a) for a in range(k)]

    # -- state -------------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return self._iteration

    def states(self) -> Tensor:
        """All agents' flat parameters, ``[K, P]``."""
        if self.vectorize:
            return self.params
        return torch.stack([a.state.params for a in self.agents])

    def _state(self, i: int) -> Tensor:
        return self.params[i] if self.vectorize else self.agents[i].state.params

    # -- one iteration -----------------------------------------------------------------------------------
    def step(self) -> Sequence[Tensor]:
        t0 = time.perf_counter()
        if self.vectorize:
            stacked = sample_agents(self.tasks, self.rngs, self.cfg.task.meta_batch).to(self.device, self.dtype)
            # In chunks of agents: one vmap over a thousand agents is 3x slower than four over 250 (cache).
            views = self.layout.split(self.params.detach())
            parts = [self._meta_gradients(tuple(v[i:i + _AGENT_CHUNK] for v in views),
                                          *(t[i:i + _AGENT_CHUNK] for t in stacked.tensors()))
                     for i in range(0, self.num_agents, _AGENT_CHUNK)]
            grads = torch.cat([self.layout.join(g) for g, _ in parts])
            losses = torch.cat([v for _, v in parts])
            self.params.grad = grads
            self.optimizer.step()
            self.params.grad = None
            t1 = time.perf_counter()
            with torch.no_grad():
                self.params.copy_(self._mix @ self.params)
            losses = list(losses.detach())
        else:
            losses = [a.adapt() for a in self.agents]
            t1 = time.perf_counter()
            phis = [a.state.params.clone() for a in self.agents]  # everyone combines the same phi_i
            for agent, plan in zip(self.agents, self.plans):
                received = {l: phis[l] for l in plan.neighbors}
                agent.set_combined(combine(plan, phis[agent.rank], received))
        self.compute_seconds += t1 - t0
        self.exchange_seconds += time.perf_counter() - t1
        self._iteration += 1
        return losses

    # -- Cohort interface (see loop.py) ------------------------------------------------------------------
    def counters(self, i: int) -> dict[str, float]:
        # Time is the whole simulation's (agents are not separable when vectorised); bytes are what agent i
        # would send under torchrun.
        return {"compute_s": self.compute_seconds, "exchange_s": self.exchange_seconds,
                "bytes_sent": self._bytes_per_iter[i] * self._iteration}

    def shared_curves(self, params: Tensor, max_steps: int, final: bool = False) -> Curves:
        return self.learner.test_curves(params.to(self.device, self.dtype), self.cfg.maml.inner_lr, max_steps, final)

    def agent_curves(self, max_steps: int, final: bool = False) -> list[Curves]:
        if not self.vectorize:  # the runtime's own code, agent after agent
            return [self.shared_curves(self._state(i), max_steps, final) for i in range(self.num_agents)]
        # Agents holding the same model are evaluated once: all of them at a shared start, and every agent of the
        # centralized baseline at every evaluation.
        states, owner = torch.unique(self.params.detach(), dim=0, return_inverse=True)
        # All agents adapt the same test tasks: one vmap over agents (of the vmap over tasks), a chunk of agents
        # at a time so that the agents x tasks adapted models in flight stay within the family's budget.
        distinct: list[Curves] = []
        for a in range(0, states.shape[0], _EVAL_AGENT_CHUNK):
            losses, scores = self.learner.test_curves(states[a:a + _EVAL_AGENT_CHUNK], self.cfg.maml.inner_lr,
                                                      max_steps, final, over_agents=True)
            distinct += [(losses[j], None if scores is None else scores[j]) for j in range(losses.shape[0])]
        return [distinct[int(i)] for i in owner]

    def all_states(self) -> Tensor:
        return self.states().detach().cpu()

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        return items

    def union(self, ids: list[int]) -> list[int]:
        return sorted(ids)

    def nonfinite(self) -> list[int]:
        finite = torch.isfinite(self.states().detach()).all(dim=1)
        return [int(k) for k in torch.nonzero(~finite).flatten()]

    def named_params(self, params: Tensor) -> dict[str, Tensor]:
        return self.layout.unflatten(params)
