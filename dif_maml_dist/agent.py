"""One agent: sample tasks -> meta-gradient -> local optimizer step (Adapt) -> exchange -> Combine.

The agent depends on a :class:`~dif_maml_dist.transport.Transport` (through its combiner and the evaluation
helpers), never on ``torch.distributed``: the same code runs as a torchrun process, as a thread over the
in-memory transport, and in tests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import seeding
from .combine import combine
from .config import Config, OptimConfig
from .flat import FlatLayout
from .maml import META_GRADIENT_PATHS, adaptation_curve, choose_path, make_loss
from .metrics import MetricsSink, NullSink, centroid_and_disagreement
from .models import MLP, reset_parameters
from .tasks import SinusoidTasks
from .topology import CombinePlan
from .transport import Transport

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
        return {"iteration": self.iteration, "params": self.params.detach().clone(),
                "optimizer": self.optimizer.state_dict(), "rng": self.rng.get_state(), "bytes_sent": self.bytes_sent}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.params.copy_(sd["params"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.rng.set_state(sd["rng"])
        self.iteration = int(sd["iteration"])
        self.bytes_sent = int(sd["bytes_sent"])


def build_model(cfg: Config) -> MLP:
    return MLP(1, cfg.model.hidden, 1)


def initial_params(cfg: Config, agent: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """PyTorch's default initialisation, drawn from a seeded stream: shared by all agents, or per agent."""
    keys = (seeding.INIT,) if cfg.train.init == "shared" else (seeding.INIT, agent)
    model = build_model(cfg)
    reset_parameters(model, seeding.generator(cfg.seed, *keys))
    layout = FlatLayout.of(model)
    return layout.flatten(dict(model.named_parameters())).detach().to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ agent
class Agent:
    """Agent ``rank`` of ``num_agents``; ``combiner`` decides the strategy."""

    def __init__(self, cfg: Config, rank: int, num_agents: int, combiner: Callable[[Tensor], Tensor],
                 device: torch.device | str = "cpu"):
        self.cfg, self.rank, self.num_agents = cfg, rank, num_agents
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.train.dtype)
        model = build_model(cfg).to(device=self.device, dtype=self.dtype)
        self.layout = FlatLayout.of(model)
        self.model = model
        self.loss = make_loss(model, self.layout)
        self.tasks = SinusoidTasks(cfg.task, rank, num_agents)
        self.eval_batch = SinusoidTasks.eval_set(cfg.task, cfg.seed).to(self.device, self.dtype)
        params = initial_params(cfg, rank, self.dtype, self.device)
        self.state = AgentState(0, params, make_optimizer(cfg.optim, params),
                                seeding.generator(cfg.seed, seeding.TASKS, rank))
        self.meta_grad_path = choose_path(cfg.maml.meta_grad_path, cfg.task.meta_batch, cfg.maml.vmap_min_tasks)
        self._meta_gradient = META_GRADIENT_PATHS[self.meta_grad_path]
        self.combiner = combiner
        self.compute_seconds = 0.0  #: time in sampling + meta-gradient + optimizer step
        self.exchange_seconds = 0.0  #: time in the combine step (communication included)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # kernels are asynchronous: time them honestly
            torch.cuda.synchronize(self.device)

    def step(self) -> Tensor:
        """One Dif-MAML iteration; returns the (detached) mean meta-training loss of its task batch."""
        m, st = self.cfg.maml, self.state
        t0 = time.perf_counter()
        batch = self.tasks.sample(st.rng, self.cfg.task.meta_batch).to(self.device, self.dtype)
        grad, loss = self._meta_gradient(self.loss, st.params, batch, m.inner_lr, m.inner_steps, m.first_order)
        st.params.grad = grad
        st.optimizer.step()  # Adapt: phi_{k,i}
        st.params.grad = None
        self._sync()
        t1 = time.perf_counter()
        combined = self.combiner(st.params)  # Combine: w_{k,i}
        with torch.no_grad():
            st.params.copy_(combined)
        self._sync()
        t2 = time.perf_counter()
        self.compute_seconds += t1 - t0
        self.exchange_seconds += t2 - t1
        st.iteration += 1
        return loss

    def test_curve(self, max_steps: int, params: Optional[Tensor] = None) -> list[float]:
        """Mean test loss on the shared test tasks after 0..max_steps adaptation steps (own or given params)."""
        p = self.state.params if params is None else params.to(self.device, self.dtype)
        return adaptation_curve(self.loss, p, self.eval_batch, self.cfg.maml.inner_lr, max_steps).tolist()

    def named_params(self, params: Optional[Tensor] = None) -> dict[str, Tensor]:
        return self.layout.unflatten(self.state.params if params is None else params)


# ------------------------------------------------------------------------------------------------ agent loop
@dataclass
class RunResult:
    """What one agent knows at the end of a run (rank 0 also holds the network-wide figures)."""

    agent: dict[str, Any]
    network: Optional[dict[str, Any]] = None
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _network_eval(agent: Agent, transport: Transport, max_steps: int) -> Optional[dict[str, Any]]:
    """Centroid test curve and disagreement. A collective over all agents: every agent must call it."""
    states = transport.all_gather_object(agent.state.params.detach().cpu())
    if transport.rank != 0:
        return None
    centroid, disagreement = centroid_and_disagreement(torch.stack(states))
    return {"centroid": centroid, "curve": agent.test_curve(max_steps, centroid), "disagreement": disagreement}


def run_agent(agent: Agent, transport: Transport, sink: MetricsSink | None = None,
              network_sink: MetricsSink | None = None, progress: bool = False) -> RunResult:
    """Train ``agent`` for ``cfg.train.iterations`` and evaluate it (and, on rank 0, the network) as scheduled.

    All agents must run this together: evaluation steps contain collectives (diagnostics only).
    """
    cfg, st = agent.cfg, agent.state
    sink = sink or NullSink()
    network_sink = network_sink or NullSink()
    tr, m = cfg.train, cfg.maml
    total = tr.iterations
    history: list[dict[str, Any]] = []

    def evaluate(record: dict[str, Any]) -> None:
        curve = agent.test_curve(m.eval_inner_steps)
        record["test_loss_pre"], record["test_loss_post"] = curve[0], curve[-1]
        net = _network_eval(agent, transport, m.eval_inner_steps)
        if net is not None:
            nrec = {"iteration": st.iteration, "centroid_test_loss_pre": net["curve"][0],
                    "centroid_test_loss_post": net["curve"][-1], "disagreement": net["disagreement"],
                    "wall_s": time.perf_counter() - start}
            network_sink.write(nrec)
            history.append(nrec)
            if progress:
                rate = (st.iteration - last["it"]) / max(time.perf_counter() - last["t"], 1e-9)
                train = record.get("meta_train_loss")
                log.info("iter %d/%d | train %s | agent0 test %.4f -> %.4f | centroid %.4f | disagreement %.3g | "
                         "%.0f it/s", st.iteration, total, "-" if train is None else f"{train:.4f}",
                         curve[0], curve[-1], net["curve"][-1], net["disagreement"], rate)
                last["it"], last["t"] = st.iteration, time.perf_counter()

    start = time.perf_counter()
    last = {"it": st.iteration, "t": start}
    window_loss, window_n = None, 0
    first = {"iteration": st.iteration, "bytes_sent": transport.bytes_sent}
    evaluate(first)
    sink.write(first)
    while st.iteration < total:
        loss = agent.step()
        window_loss = loss if window_loss is None else window_loss + loss
        window_n += 1
        it = st.iteration
        is_eval = it % tr.eval_every == 0 or it == total
        if is_eval or it % tr.log_every == 0:
            mean_loss = float(window_loss) / window_n
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"agent {agent.rank}: meta-training loss is {mean_loss} at iteration {it}; "
                                         f"lower optim.lr or maml.inner_lr")
            record = {"iteration": it, "meta_train_loss": mean_loss,
                      "compute_s": agent.compute_seconds, "exchange_s": agent.exchange_seconds,
                      "bytes_sent": transport.bytes_sent, "wall_s": time.perf_counter() - start}
            window_loss, window_n = None, 0
            if is_eval:
                evaluate(record)
            sink.write(record)

    # Final figures: loss vs number of adaptation steps, per agent and for the centroid.
    st.bytes_sent = transport.bytes_sent
    horizon = max(m.final_adapt_steps, m.eval_inner_steps)
    curve = agent.test_curve(horizon)
    mine = {"agent": agent.rank, "final_test_loss": curve[m.eval_inner_steps], "final_test_loss_pre": curve[0],
            "adaptation_curve": curve[:m.final_adapt_steps + 1], "bytes_sent": transport.bytes_sent,
            "compute_seconds": agent.compute_seconds, "exchange_seconds": agent.exchange_seconds}
    agents = transport.all_gather_object(mine)
    net = _network_eval(agent, transport, horizon)
    wall = time.perf_counter() - start
    network = None
    if net is not None:
        network = {"agents": agents, "centroid": net["centroid"], "disagreement": net["disagreement"],
                   "centroid_test_loss": net["curve"][m.eval_inner_steps], "centroid_test_loss_pre": net["curve"][0],
                   "centroid_adaptation_curve": net["curve"][:m.final_adapt_steps + 1]}
    return RunResult(mine, network, wall, history)
