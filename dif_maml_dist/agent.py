"""One agent: sample tasks -> meta-gradient -> local optimizer step (Adapt) -> exchange -> Combine.

The agent depends on a :class:`~dif_maml_dist.transport.Transport` (through its combiner, ``gossip.py``, and the
evaluation helpers), never on ``torch.distributed``: the same code runs as a torchrun process, as a thread over
the in-memory transport, and in tests.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import seeding
from .config import Config, OptimConfig
from .flat import FlatLayout
from .gossip import make_combiner
from .learner import Learner
from .maml import choose_path, meta_gradient
from .loop import Checkpointer, RunResult, run_loop
from .metrics import Curves, MetricsSink
from .models import reset_parameters
from .schedules import GraphSchedule
from .tasks import TaskFamily, task_family
from .transport import PeerError, Transport

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ agent state
def make_optimizer(cfg: OptimConfig, params: Tensor) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam([params], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD([params], lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optim {cfg.name!r}")


@dataclass
class AgentState:
    """Everything that evolves in an agent's training step; ``state_dict`` round-trips it exactly."""

    iteration: int
    params: Tensor  #: flat parameter vector, the agent's w_{k,i}
    optimizer: torch.optim.Optimizer  #: local only, never combined
    rng: torch.Generator  #: the agent's task stream

    def state_dict(self) -> dict[str, Any]:
        # A snapshot: optimizer.state_dict() holds references to the live moment tensors.
        return {"iteration": self.iteration, "params": self.params.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "rng": self.rng.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.params.copy_(sd["params"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.rng.set_state(sd["rng"])
        self.iteration = int(sd["iteration"])


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

    def __init__(self, cfg: Config, rank: int, num_agents: int, device: torch.device | str = "cpu",
                 learner: Optional[Learner] = None):
        """Not connected to other agents until :meth:`connect` (the simulator combines for its agents itself).
        ``learner``: share one (its dataset, its test sets) between agents of one process; built if not given."""
        self.cfg, self.rank, self.num_agents = cfg, rank, num_agents
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.train.dtype)
        self.learner = learner or Learner.build(cfg, self.device, self.dtype)
        self.layout = self.learner.layout
        self.tasks = self.learner.family.sampler(rank, num_agents)
        params = initial_params(cfg, rank, self.dtype, self.device, self.learner.family)
        self._initial = params.clone()
        self.state = AgentState(0, params, make_optimizer(cfg.optim, params),
                                seeding.generator(cfg.seed, seeding.TASKS, rank))
        m = cfg.maml
        self.meta_grad_path = choose_path(m.meta_grad_path, self.learner.model.kind, cfg.task.meta_batch,
                                          m.vmap_min_tasks)
        self.combiner: Optional[Callable[[Tensor, int], Tensor]] = None  #: (phi, iteration) -> w; see connect
        self.compute_seconds = 0.0  #: time in sampling + meta-gradient + optimizer step
        self.exchange_seconds = 0.0  #: time in the combine step (communication included)

    def connect(self, schedule: GraphSchedule, transport: Transport) -> "Agent":
        """Combine through ``transport`` with the graphs of ``schedule``, as ``cfg.strategy`` and
        ``cfg.compression`` say (``gossip.make_combiner``)."""
        self.combiner = make_combiner(self.cfg, schedule, self.rank, transport, self.initial_params_of)
        return self

    def initial_params_of(self, agent: int) -> Tensor:
        """Agent ``agent``'s initial model: a function of the seed, so any agent can compute any other's."""
        if agent == self.rank or self.cfg.train.init == "shared":
            return self._initial.clone()
        return initial_params(self.cfg, agent, self.dtype, self.device, self.learner.family)

    def _sync(self) -> None:
        # Kernels are asynchronous: compute_s / exchange_s are device times only if the host waits for them here,
        # which costs two synchronisations per iteration; by default the GPU runs ahead (runtime.time_phases).
        if self.device.type == "cuda" and self.cfg.runtime.time_phases:
            torch.cuda.synchronize(self.device)

    def adapt(self) -> Tensor:
        """Adapt: sample tasks, meta-gradient, local optimizer step; ``state.params`` then holds phi_{k,i}.

        Returns the (detached) mean meta-training loss of the task batch.
        """
        m, st = self.cfg.maml, self.state
        t0 = time.perf_counter()
        batch = self.tasks.sample(st.rng, self.cfg.task.meta_batch).to_device(self.device, self.dtype)
        learner = self.learner
        grads, loss = meta_gradient(self.meta_grad_path, learner.loss, learner.batched_loss,
                                    self.layout.split(st.params), batch, m.inner_lr, m.inner_steps, m.first_order,
                                    m.vmap_chunk, learner.query_loss)
        st.params.grad = self.layout.join(grads)
        st.optimizer.step()
        st.params.grad = None
        self._sync()
        self.compute_seconds += time.perf_counter() - t0
        return loss

    def set_combined(self, combined: Tensor) -> None:
        """Combine's result becomes w_{k,i} (after a local step, ``strategy.combine_every``, it is phi itself, the
        parameters as they are); the iteration is complete."""
        if combined is not self.state.params:
            with torch.no_grad():
                self.state.params.copy_(combined)
        self.state.iteration += 1

    def step(self) -> Tensor:
        """One Dif-MAML iteration (Adapt, then Combine through the combiner); returns the meta-training loss."""
        loss = self.adapt()
        t1 = time.perf_counter()
        try:
            combined = self.combiner(self.state.params, self.state.iteration + 1)
        except PeerError as err:
            raise PeerError(f"agent {self.rank}, iteration {self.state.iteration + 1}: {err} "
                            f"[runtime.timeout_s={self.cfg.runtime.timeout_s:g}]", err.peer) from None
        self.set_combined(combined)
        self._sync()
        self.exchange_seconds += time.perf_counter() - t1
        return loss

    def named_params(self, params: Optional[Tensor] = None) -> dict[str, Tensor]:
        return self.layout.unflatten(self.state.params if params is None else params)

    def state_dict(self) -> dict[str, Any]:
        """The agent's whole loop state: ``AgentState``, its combiner's (compression copies), its time counters."""
        return {**self.state.state_dict(), "compute_s": self.compute_seconds, "exchange_s": self.exchange_seconds,
                "combiner": self.combiner.state_dict() if self.combiner is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``state_dict``'s output: the next iteration is the one after it."""
        self.state.load_state_dict(sd)
        if self.combiner is not None:
            self.combiner.load_state_dict(sd.get("combiner", {}))
        self.compute_seconds, self.exchange_seconds = float(sd["compute_s"]), float(sd["exchange_s"])


# ------------------------------------------------------------------------------------------------ agent loop
class AgentCohort:
    """One agent in its own process: the :class:`~dif_maml_dist.loop.Cohort` that torchrun runs."""

    networked = True  #: see loop.Cohort

    def __init__(self, agent: Agent, transport: Transport):
        self.agent, self.transport = agent, transport
        self.cfg = agent.cfg
        self.agent_ids = (agent.rank,)
        self.is_root = transport.rank == 0

    @property
    def iteration(self) -> int:
        return self.agent.state.iteration

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of this process holds: the agent's loop state and the bytes it has sent (counted by
        the transport, their one owner)."""
        return {**self.agent.state_dict(), "bytes_sent": self.transport.bytes_sent}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.agent.load_state_dict(sd)
        self.transport.bytes_sent = int(sd["bytes_sent"])

    def step(self) -> list[Tensor]:
        return [self.agent.step()]

    def counters(self, i: int) -> dict[str, float]:
        return {"compute_s": self.agent.compute_seconds, "exchange_s": self.agent.exchange_seconds,
                "bytes_sent": self.transport.bytes_sent}

    def agent_curves(self, max_steps: int, final: bool = False) -> list[Curves]:
        return [self.agent.learner.test_curves(self.agent.state.params, self.cfg.maml.inner_lr, max_steps, final)]

    def all_states(self) -> Tensor:
        return torch.stack(self.transport.all_gather_object(self.agent.state.params.detach().cpu()))

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        everyone = self.transport.all_gather_object(items)
        return [item for part in everyone for item in part] if self.is_root else None

    def shared_curves(self, params: Tensor, max_steps: int, final: bool = False,
                      validation: bool = False) -> Curves:
        # Each rank adapts its own slice of the test tasks and the slices are gathered in task order, so the
        # figures do not depend on how many ranks shared the work. The slices are equal, so no rank waits in the
        # gather for longer than the evaluation of one slice takes.
        learner, rank, world = self.agent.learner, self.transport.rank, self.transport.world_size
        n = learner.num_tests(final, validation)
        start, stop = n * rank // world, n * (rank + 1) // world
        losses, scores = learner.curves(params.to(learner.device, learner.dtype), self.cfg.maml.inner_lr, max_steps,
                                        start, stop, validation=validation)
        # Every rank gets every slice (the gather is an all-gather): all of them see the same figures, so they can
        # make the same decisions from them (the best model by validation accuracy).
        parts = self.transport.all_gather_object((losses.cpu(), None if scores is None else scores.cpu()))
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
    return run_loop(AgentCohort(agent, transport), None if sink is None else [sink], network_sink, progress,
                    checkpointer)
