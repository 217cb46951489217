"""One agent: sample tasks -> meta-gradient -> local optimizer step (Adapt) -> exchange -> Combine.

The agent depends on a :class:`~dif_maml_dist.transport.Transport` (through its combiner and the evaluation
helpers), never on ``torch.distributed``: the same code runs as a torchrun process, as a thread over the
in-memory transport, and in tests.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import seeding
from .combine import combine
from .config import Config, OptimConfig
from .flat import FlatLayout
from .maml import (LossFn, TaskBatch, adaptation_curves, adaptation_curves_loop, choose_path, make_loss,
                   meta_gradient)
from .loop import Checkpointer, RunResult, run_loop
from .metrics import MetricsSink
from .models import FunctionalModel, functional, reset_parameters
from .tasks import TaskFamily, TaskSet, task_family
from .topology import CombinePlan
from .transport import PeerError, Transport

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- combine step
class NeighborCombiner:
    """Dif-MAML: exchange ``phi`` with the graph neighbours, then ``w_k = sum_l A[l, k] phi_l``."""

    def __init__(self, plan: CombinePlan, transport: Transport):
        self.plan, self.transport = plan, transport

    def __call__(self, phi: Tensor) -> Tensor:
        return combine(self.plan, phi, self.transport.exchange(phi, self.plan.neighbors))


class MeanCombiner:
    """Centralized baseline: ``A = 11^T/K``, i.e. an all-reduce mean over every agent."""

    def __init__(self, transport: Transport):
        self.transport = transport

    def __call__(self, phi: Tensor) -> Tensor:
        return self.transport.all_reduce_mean(phi)


class NoCombiner:
    """Non-cooperative baseline: ``A = I``, nothing is sent."""

    def __call__(self, phi: Tensor) -> Tensor:
        return phi


def make_combiner(strategy: str, plan: CombinePlan, transport: Transport):
    if strategy == "dif_maml":
        return NeighborCombiner(plan, transport)
    if strategy == "centralized":
        return MeanCombiner(transport)
    if strategy == "noncooperative":
        return NoCombiner()
    raise ValueError(f"unknown strategy {strategy!r}")


# ------------------------------------------------------------------------------------------------ agent state
def make_optimizer(cfg: OptimConfig, params: Tensor) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam([params], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD([params], lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optim {cfg.name!r}")


@dataclass
class AgentState:
    """Everything that evolves in an agent's loop; ``state_dict`` round-trips it exactly."""

    iteration: int
    params: Tensor  #: flat parameter vector, the agent's w_{k,i}
    optimizer: torch.optim.Optimizer  #: local only, never combined
    rng: torch.Generator  #: the agent's task stream
    bytes_sent: int = 0

    def state_dict(self) -> dict[str, Any]:
        # A snapshot: optimizer.state_dict() holds references to the live moment tensors.
        return {"iteration": self.iteration, "params": self.params.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "rng": self.rng.get_state(),
                "bytes_sent": self.bytes_sent}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.params.copy_(sd["params"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.rng.set_state(sd["rng"])
        self.iteration = int(sd["iteration"])
        self.bytes_sent = int(sd["bytes_sent"])


def build_model(cfg: Config) -> nn.Module:
    """The architecture of ``cfg``'s task family (weights as PyTorch initialises them)."""
    return task_family(cfg).build_model()


@dataclass
class Learner:
    """A task family bound to a device and dtype: what an agent (or the simulator) trains and evaluates."""

    family: TaskFamily
    model: FunctionalModel
    loss: LossFn  #: ``loss(params, x, y)``, one task at a time (the per-task loop)
    batched_loss: LossFn  #: the same, exact under vmap (the vmap path, the simulator)
    tests: TaskSet  #: the shared test tasks of the final figures (TaskBatch on the device, or a lazy EpisodeSet)
    eval_tasks: int  #: the first eval_tasks of ``tests`` are evaluated during training
    device: torch.device
    dtype: torch.dtype

    @property
    def layout(self) -> FlatLayout:
        return self.model.layout

    @classmethod
    def build(cls, cfg: Config, device: torch.device, dtype: torch.dtype) -> "Learner":
        family = task_family(cfg)
        model = functional(family.build_model().to(device=device, dtype=dtype))
        t = cfg.task
        # One seeded stream: the periodic test set is the first eval_tasks tasks of the final one.
        tests = family.eval_set(cfg.seed, max(t.final_eval_tasks or t.eval_tasks, t.eval_tasks))
        if isinstance(tests, TaskBatch):
            tests = tests.to(device, dtype)  # small enough to live on the device for the whole run
        return cls(family, model, make_loss(model.forward, family.criterion),
                   make_loss(model.batched_forward, family.criterion), tests, t.eval_tasks, device, dtype)

    @property
    def eval_path(self) -> str:
        """How test tasks are adapted: vmap over a chunk of tasks, or one task at a time (the same choice as the
        meta-gradient's ``auto``, at the chunk size)."""
        return choose_path("auto", self.model.kind, self.family.eval_chunk)

    def num_tests(self, final: bool) -> int:
        return len(self.tests) if final else self.eval_tasks

    def curves(self, params: Tensor, inner_lr: float, max_steps: int, start: int, stop: int,
               over_agents: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Per-task test loss (and metric) after 0..max_steps adaptation steps on test tasks ``start:stop``:
        ``[tasks, max_steps+1]``, or ``[agents, tasks, max_steps+1]`` for stacked ``[agents, P]`` params
        (``over_agents``)."""
        if over_agents and self.eval_path == "loop":
            parts = [self.curves(p, inner_lr, max_steps, start, stop) for p in params]
            return (torch.stack([p[0] for p in parts]),
                    None if self.family.metric is None else torch.stack([p[1] for p in parts]))
        chunk, parts = self.family.eval_chunk, []
        if over_agents:  # the vmap holds agents x tasks adapted models at once: keep that product bounded
            chunk = max(1, chunk // params.shape[0])
        if start >= stop:  # more ranks than test tasks: this one has none
            empty = params.new_zeros((*params.shape[:-1], 0, max_steps + 1))
            return empty, (empty if self.family.metric is not None else None)
        views = self.layout.split(params)
        fam = self.family
        for i in range(start, stop, chunk):  # gathered a chunk at a time: see tasks.episodes.EpisodeSet
            batch = self.tests.slice(i, min(i + chunk, stop)).to(self.device, self.dtype)
            if self.eval_path == "loop":
                parts.append(adaptation_curves_loop(self.model.eval_forward, fam.criterion, views, batch, inner_lr,
                                                    max_steps, fam.metric))
            else:
                parts.append(adaptation_curves(self.model.batched_forward, fam.criterion, views, batch, inner_lr,
                                               max_steps, fam.metric, chunk=chunk, over_agents=over_agents))
        dim = 1 if over_agents else 0
        losses = torch.cat([p[0] for p in parts], dim=dim)
        return losses, torch.cat([p[1] for p in parts], dim=dim) if fam.metric is not None else None

    def evaluate(self, params: Tensor, inner_lr: float, max_steps: int, final: bool = False) -> dict[str, list[float]]:
        """Test figures of ``params`` after 0..max_steps adaptation steps on the shared test tasks: mean ``loss``,
        and where the family has a metric, mean ``accuracy`` with its 95% confidence half-width over tasks."""
        return figures(*self.curves(params, inner_lr, max_steps, 0, self.num_tests(final)))


def figures(losses: Tensor, scores: Optional[Tensor]) -> dict[str, list[float]]:
    """Test figures from per-task curves ``[tasks, steps+1]``: mean ``loss``, and with scores, mean ``accuracy``
    and its 95% confidence half-width over tasks."""
    out = {"loss": losses.mean(0).tolist()}
    if scores is not None:
        out["accuracy"] = scores.mean(0).tolist()
        out["accuracy_ci95"] = (1.96 * scores.std(0) / math.sqrt(scores.shape[0])).tolist()
    return out


def initial_params(cfg: Config, agent: int, dtype: torch.dtype, device: torch.device,
                   family: Optional[TaskFamily] = None) -> Tensor:
    """PyTorch's default initialisation, drawn from a seeded stream: shared by all agents, or per agent.

    Pass the caller's ``family`` when it has one: building a family may load a dataset.
    """
    keys = (seeding.INIT,) if cfg.train.init == "shared" else (seeding.INIT, agent)
    model = (family or task_family(cfg)).build_model()
    reset_parameters(model, seeding.generator(cfg.seed, *keys))
    return FlatLayout.of(model).flatten(dict(model.named_parameters())).detach().to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ agent
class Agent:
    """Agent ``rank`` of ``num_agents``; ``combiner`` decides the strategy."""

    def __init__(self, cfg: Config, rank: int, num_agents: int, combiner: Optional[Callable[[Tensor], Tensor]],
                 device: torch.device | str = "cpu", learner: Optional[Learner] = None):
        """``combiner`` maps phi to w (see ``make_combiner``); ``None`` when the caller combines (the simulator).
        ``learner``: share one (its dataset, its test sets) between agents of one process; built if not given."""
        self.cfg, self.rank, self.num_agents = cfg, rank, num_agents
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.train.dtype)
        self.learner = learner or Learner.build(cfg, self.device, self.dtype)
        self.layout, self.loss = self.learner.layout, self.learner.loss
        self.tasks = self.learner.family.sampler(rank, num_agents)
        params = initial_params(cfg, rank, self.dtype, self.device, self.learner.family)
        self.state = AgentState(0, params, make_optimizer(cfg.optim, params),
                                seeding.generator(cfg.seed, seeding.TASKS, rank))
        m = cfg.maml
        self.meta_grad_path = choose_path(m.meta_grad_path, self.learner.model.kind, cfg.task.meta_batch,
                                          m.vmap_min_tasks)
        self.combiner = combiner
        self.compute_seconds = 0.0  #: time in sampling + meta-gradient + optimizer step
        self.exchange_seconds = 0.0  #: time in the combine step (communication included)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # kernels are asynchronous: time them honestly
            torch.cuda.synchronize(self.device)

    def adapt(self) -> Tensor:
        """Adapt: sample tasks, meta-gradient, local optimizer step; ``state.params`` then holds phi_{k,i}.

        Returns the (detached) mean meta-training loss of the task batch.
        """
        m, st = self.cfg.maml, self.state
        t0 = time.perf_counter()
        batch = self.tasks.sample(st.rng, self.cfg.task.meta_batch).to(self.device, self.dtype)
        grads, loss = meta_gradient(self.meta_grad_path, self.loss, self.learner.batched_loss,
                                    self.layout.split(st.params), batch, m.inner_lr, m.inner_steps, m.first_order,
                                    m.vmap_chunk)
        st.params.grad = self.layout.join(grads)
        st.optimizer.step()
        st.params.grad = None
        self._sync()
        self.compute_seconds += time.perf_counter() - t0
        return loss

    def set_combined(self, combined: Tensor) -> None:
        """Combine's result becomes w_{k,i}; the iteration is complete."""
        with torch.no_grad():
            self.state.params.copy_(combined)
        self.state.iteration += 1

    def step(self) -> Tensor:
        """One Dif-MAML iteration (Adapt, then Combine through the combiner); returns the meta-training loss."""
        loss = self.adapt()
        t1 = time.perf_counter()
        try:
            combined = self.combiner(self.state.params)
        except PeerError as err:
            raise PeerError(f"agent {self.rank}, iteration {self.state.iteration + 1}: {err} "
                            f"[runtime.timeout_s={self.cfg.runtime.timeout_s:g}]", err.peer) from None
        self.set_combined(combined)
        self._sync()
        self.exchange_seconds += time.perf_counter() - t1
        return loss

    def evaluate(self, max_steps: int, params: Optional[Tensor] = None, final: bool = False) -> dict[str, list[float]]:
        """Test figures after 0..max_steps adaptation steps (own or given params), see ``Learner.evaluate``."""
        p = self.state.params if params is None else params.to(self.device, self.dtype)
        return self.learner.evaluate(p, self.cfg.maml.inner_lr, max_steps, final)

    def named_params(self, params: Optional[Tensor] = None) -> dict[str, Tensor]:
        return self.layout.unflatten(self.state.params if params is None else params)

    def checkpoint_state(self, bytes_sent: int) -> dict[str, Any]:
        """What a checkpoint holds: the loop state (``AgentState``) and the cumulative counters."""
        self.state.bytes_sent = bytes_sent
        return {**self.state.state_dict(), "compute_s": self.compute_seconds, "exchange_s": self.exchange_seconds}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint_state``'s output: the next iteration is the one after it."""
        self.state.load_state_dict(checkpoint)
        self.compute_seconds, self.exchange_seconds = float(checkpoint["compute_s"]), float(checkpoint["exchange_s"])


# ------------------------------------------------------------------------------------------------ agent loop
class AgentCohort:
    """One agent in its own process: the :class:`~dif_maml_dist.loop.Cohort` that torchrun runs."""

    def __init__(self, agent: Agent, transport: Transport):
        self.agent, self.transport = agent, transport
        self.cfg = agent.cfg
        self.agent_ids = (agent.rank,)
        self.is_root = transport.rank == 0

    @property
    def iteration(self) -> int:
        return self.agent.state.iteration

    def step(self) -> list[Tensor]:
        return [self.agent.step()]

    def counters(self, i: int) -> dict[str, float]:
        return {"compute_s": self.agent.compute_seconds, "exchange_s": self.agent.exchange_seconds,
                "bytes_sent": self.transport.bytes_sent}

    def evaluate_agents(self, max_steps: int, final: bool = False) -> list[dict[str, list[float]]]:
        return [self.agent.evaluate(max_steps, final=final)]

    def all_states(self) -> Tensor:
        return torch.stack(self.transport.all_gather_object(self.agent.state.params.detach().cpu()))

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        everyone = self.transport.all_gather_object(items)
        return [item for part in everyone for item in part] if self.is_root else None

    def evaluate_params(self, params: Tensor, max_steps: int, final: bool = False) -> Optional[dict[str, list[float]]]:
        curves = self.shared_curves(params, max_steps, final)
        return None if curves is None else figures(*curves)

    def shared_curves(self, params: Tensor, max_steps: int, final: bool = False
                      ) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """*Collective*: per-task curves of ``params`` (the same on every rank) over the whole test set, on the
        root. Each rank adapts its own slice of the test tasks and the slices are gathered in task order, so the
        figures do not depend on how many ranks shared the work. The slices are equal, so no rank waits in the
        gather for longer than the evaluation of one slice takes."""
        learner, rank, world = self.agent.learner, self.transport.rank, self.transport.world_size
        n = learner.num_tests(final)
        start, stop = n * rank // world, n * (rank + 1) // world
        losses, scores = learner.curves(params.to(learner.device, learner.dtype), self.cfg.maml.inner_lr, max_steps,
                                        start, stop)
        parts = self.transport.all_gather_object((losses.cpu(), None if scores is None else scores.cpu()))
        if not self.is_root:
            return None
        return (torch.cat([p[0] for p in parts]), None if scores is None else torch.cat([p[1] for p in parts]))

    def union(self, ids: list[int]) -> list[int]:
        return sorted({i for part in self.transport.all_gather_object(ids) for i in part})

    def nonfinite(self) -> list[int]:
        return [] if bool(torch.isfinite(self.agent.state.params).all()) else [self.agent.rank]


def run_agent(agent: Agent, transport: Transport, sink: MetricsSink | None = None,
              network_sink: MetricsSink | None = None, progress: bool = False,
              checkpointer: Optional[Checkpointer] = None) -> RunResult:
    """Train ``agent`` as one process of the network (every agent must run this together: evaluation steps
    contain collectives, for diagnostics only)."""
    result = run_loop(AgentCohort(agent, transport), None if sink is None else [sink], network_sink, progress,
                      checkpointer)
    agent.state.bytes_sent = transport.bytes_sent
    return result
