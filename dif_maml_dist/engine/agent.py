"""One agent: sample tasks -> meta-gradient -> local optimizer step (Adapt) -> exchange -> Combine; or, with
``strategy.overlap``, the exchange of the previous state posted first and combined with the local step after.

The agent receives its Combine step (a ``gossip.combiners.Combiner``), which talks to a ``comm`` transport; it
never sees ``torch.distributed``: the same code runs as a torchrun process, as a thread over the in-memory
transport, and in tests.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from dif_maml_dist import seeding
from dif_maml_dist.comm.liveness import PeerError
from dif_maml_dist.config import Config, OptimConfig
from dif_maml_dist.engine.learner import Learner
from dif_maml_dist.gossip.combiners import Combiner, make_combiner
from dif_maml_dist.graphs.schedules import GraphSchedule
from dif_maml_dist.learning.algorithms import build_algorithm, choose_path
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.models import MLP, Conv4, reset_parameters
from dif_maml_dist.tasks import TaskFamily, task_family

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ agent state
#: ``optim=NAME`` -> the agent's local optimizer over its flat parameters (config validation reads the names)
OPTIMIZERS: dict[str, Callable[[OptimConfig, Tensor], torch.optim.Optimizer]] = {
    "adam": lambda cfg, params: torch.optim.Adam([params], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps),
    "sgd": lambda cfg, params: torch.optim.SGD([params], lr=cfg.lr, momentum=cfg.momentum),
}


def make_optimizer(cfg: OptimConfig, params: Tensor) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim {cfg.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.name](cfg, params)


#: ``optim.schedule=NAME`` -> mu at iteration i (1-based) of n, a pure function of the iteration: nothing to
#: checkpoint, and every agent (and the simulator) steps with the same mu
LR_SCHEDULES: dict[str, Callable[[OptimConfig, int, int], float]] = {
    "constant": lambda cfg, i, n: cfg.lr,
    "cosine": lambda cfg, i, n: cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (i - 1) / max(n - 1, 1)))
    / 2,
}


def set_outer_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iteration: int, iterations: int) -> None:
    """Give ``optimizer`` the schedule's mu for ``iteration`` (left alone under the constant schedule)."""
    if cfg.schedule != "constant":
        for group in optimizer.param_groups:
            group["lr"] = LR_SCHEDULES[cfg.schedule](cfg, iteration, iterations)


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
    """The initial model, drawn from a seeded stream: shared by all agents, or per agent. The built-in models get
    PyTorch's default initialisation from the ``INIT`` stream; any other module keeps its own initialisation, drawn
    while it is built under the global RNG seeded from the ``MODULE_INIT`` stream (the same in every process).

    Pass the caller's ``family`` when it has one: building a family may load a dataset.
    """
    per_agent = () if cfg.train.init == "shared" else (agent,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive_seed(cfg.seed, seeding.Stream.MODULE_INIT, *per_agent))
        model = (family or task_family(cfg)).build_model()
    if type(model) in (MLP, Conv4):
        reset_parameters(model, seeding.generator(cfg.seed, seeding.Stream.INIT, *per_agent))
    layout = FlatLayout.of(model)
    weights = layout.flatten(dict(model.named_parameters())).detach().to(device=device, dtype=dtype)
    rates = build_algorithm(cfg.maml, layout).inner.initial_rates(dtype, weights.device)  # learned: alpha at first
    return torch.cat([weights, rates]) if rates.numel() else weights


class InitialModels:
    """Every agent's initial model, a function of the seed, so that any agent can compute any other's (the
    compression copies of a neighbour's state start from its initial model). Computed once per distinct model."""

    def __init__(self, cfg: Config, dtype: torch.dtype, device: torch.device | str, family: TaskFamily):
        self.cfg, self.dtype, self.device, self.family = cfg, dtype, torch.device(device), family
        self._made: dict[int, Tensor] = {}

    def __call__(self, agent: int) -> Tensor:
        """Agent ``agent``'s initial flat parameters (a fresh tensor: the caller may change it)."""
        key = 0 if self.cfg.train.init == "shared" else agent
        if key not in self._made:
            self._made[key] = initial_params(self.cfg, agent, self.dtype, self.device, self.family)
        return self._made[key].clone()


# ------------------------------------------------------------------------------------------------------ agent
class Agent:
    """Agent ``rank`` of ``num_agents``; ``combiner`` decides the strategy."""

    def __init__(self, cfg: Config, rank: int, num_agents: int, device: torch.device | str = "cpu",
                 learner: Optional[Learner] = None, combiner: Optional[Combiner] = None,
                 initial: Optional[InitialModels] = None):
        """``learner``: share one (its dataset, its test sets) between agents of one process; built if not given.
        ``combiner``: the Combine step :meth:`step` ends with (``gossip.combiners``; :func:`networked_agent`
        builds it); without one the agent only adapts, and whoever drives it combines (the simulator).
        ``initial``: the initial models, when the caller has them (shared with the combiner's copies)."""
        self.cfg, self.rank, self.num_agents = cfg, rank, num_agents
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.train.dtype)
        self.learner = learner or Learner.build(cfg, self.device, self.dtype, agents=[rank], num_agents=num_agents)
        self.layout = self.learner.layout
        self.tasks = self.learner.family.sampler(rank, num_agents)
        self.initial = initial or InitialModels(cfg, self.dtype, self.device, self.learner.family)
        params = self.initial(rank)
        self.state = AgentState(0, params, make_optimizer(cfg.optim, params),
                                seeding.generator(cfg.seed, seeding.Stream.TASKS, rank))
        m = cfg.maml
        self.meta_grad_path = choose_path(m.meta_grad_path, self.learner.model.kind, cfg.task.meta_batch,
                                          m.vmap_min_tasks)
        self.combiner = combiner
        #: runtime.slowdown: how many times longer this agent's meta-gradient takes (fault injection)
        self.slowdown = {int(a): float(f) for a, f in cfg.runtime.slowdown}.get(rank, 1.0)
        self.compute_seconds = 0.0  #: time in sampling + meta-gradient + optimizer step
        self.exchange_seconds = 0.0  #: time in the combine step (communication included)

    def _sync(self) -> None:
        # Kernels are asynchronous: compute_s / exchange_s are device times only if the host waits for them here,
        # which costs two synchronisations per iteration; by default the GPU runs ahead (runtime.time_phases).
        if self.device.type == "cuda" and self.cfg.runtime.time_phases:
            torch.cuda.synchronize(self.device)

    def meta_gradient(self) -> tuple[Tensor, Tensor]:
        """Sample a task batch; the flat meta-gradient at the current parameters and the batch's (detached) mean
        meta-training loss."""
        m, st = self.cfg.maml, self.state
        t0 = time.perf_counter()
        batch = self.tasks.sample(st.rng, self.cfg.task.meta_batch).to_device(self.device, self.dtype)
        learner = self.learner
        grads, loss = learner.algorithm.meta_gradient(self.meta_grad_path, learner.losses,
                                                      self.layout.split(st.params), batch, st.iteration + 1,
                                                      m.vmap_chunk)
        self._sync()
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
        self.compute_seconds += time.perf_counter() - t0
        return self.layout.join(grads), loss

    def local_step(self, grad: Tensor) -> None:
        """The local optimizer's step with ``grad``, applied to the parameters as they are now."""
        t0 = time.perf_counter()
        st = self.state
        set_outer_lr(st.optimizer, self.cfg.optim, st.iteration + 1, self.cfg.train.iterations)
        st.params.grad = grad
        st.optimizer.step()
        st.params.grad = None
        self._sync()
        self.compute_seconds += time.perf_counter() - t0

    def adapt(self) -> Tensor:
        """Adapt: sample tasks, meta-gradient, local optimizer step; ``state.params`` then holds phi_{k,i}.

        Returns the (detached) mean meta-training loss of the task batch.
        """
        grad, loss = self.meta_gradient()
        self.local_step(grad)
        return loss

    def set_combined(self, combined: Tensor) -> None:
        """Combine's result becomes w_{k,i} (after a local step, ``strategy.combine_every``, it is phi itself, the
        parameters as they are); the iteration is complete."""
        if combined is not self.state.params:
            with torch.no_grad():
                self.state.params.copy_(combined)
        self.state.iteration += 1

    def finish_overlapped(self, combined: Tensor, grad: Tensor) -> None:
        """Complete an overlapped iteration: ``w_{k,i} = combined - mu * step(grad)``, ``combined`` being the
        combination of the neighbours' previous states and ``grad`` the meta-gradient at this agent's previous
        state. The optimizer's step does not depend on the parameters it is added to (Adam, SGD), so applying it
        to the combined state is the adapt-while-combine recursion exactly."""
        if combined is not self.state.params:  # a local step (strategy.combine_every): nothing was combined
            with torch.no_grad():
                self.state.params.copy_(combined)
        self.local_step(grad)
        self.state.iteration += 1

    def _combining(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except PeerError as err:
            raise PeerError(f"agent {self.rank}, iteration {self.state.iteration + 1}: {err} "
                            f"[runtime.timeout_s={self.cfg.runtime.timeout_s:g}]", err.peer) from None

    def step(self) -> Tensor:
        """One iteration through the combiner; returns the meta-training loss. Synchronous: Adapt, then Combine
        (with ``strategy.staleness``, the neighbours' states of an earlier round). Overlapped
        (``strategy.overlap``): this agent's state is posted to its neighbours, the meta-gradient is computed while
        the messages travel, and the step is added to the combination (``finish_overlapped``)."""
        if not self.cfg.strategy.overlap:
            loss = self.adapt()
            t1 = time.perf_counter()
            combined = self._combining(lambda: self.combiner(self.state.params, self.state.iteration + 1))
            self.set_combined(combined)
            if self.state.iteration == self.cfg.train.iterations:  # the last: no transfer left running at exit
                self._combining(self.combiner.settle)
            self._sync()
            self.exchange_seconds += time.perf_counter() - t1
            return loss
        t0 = time.perf_counter()
        # The posted state is the parameters themselves: they stay untouched until the round has been waited on
        # (the meta-gradient only reads them), so no copy is made while the messages may still be in flight.
        pending = self._combining(lambda: self.combiner.post(self.state.params, self.state.iteration + 1))
        self.exchange_seconds += time.perf_counter() - t0
        grad, loss = self.meta_gradient()
        t1 = time.perf_counter()
        combined = self._combining(pending.wait)
        self.exchange_seconds += time.perf_counter() - t1
        self.finish_overlapped(combined, grad)
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


def networked_agent(cfg: Config, rank: int, num_agents: int, schedule: GraphSchedule, transport: Any,
                    device: torch.device | str = "cpu", learner: Optional[Learner] = None) -> Agent:
    """Agent ``rank`` combining through ``transport`` on the graphs of ``schedule``, as ``cfg.strategy`` and
    ``cfg.compression`` say (``gossip.combiners.make_combiner``)."""
    device = torch.device(device)
    learner = learner or Learner.build(cfg, device, getattr(torch, cfg.train.dtype), agents=[rank],
                                       num_agents=num_agents)
    initial = InitialModels(cfg, learner.dtype, device, learner.family)
    combiner = make_combiner(cfg, schedule, rank, transport, initial)
    return Agent(cfg, rank, num_agents, device, learner, combiner, initial)
