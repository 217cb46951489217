"""All K agents in one process, in lock-step, with the dense combination matrix.

The numerical reference for the distributed runtime and the tool for large-K studies. It uses the runtime's
own building blocks (per-agent seeded task samplers, MAML functions, optimizers, initialisation), and runs
through the same schedule (:func:`~dif_maml_dist.engine.loop.run_loop`), so its outputs have the runtime's format.

Two engines:

- ``per_agent`` (``simulate.vectorize=false``): K :class:`~dif_maml_dist.engine.agent.Agent` objects; each adapts with
  exactly the runtime's code, then each combines with the runtime's :func:`~dif_maml_dist.gossip.combine.combine`
  (same terms, same order). Dif-MAML and non-cooperative runs equal the torchrun processes bit for bit.
- ``vectorized`` (default): one ``[K, P]`` parameter tensor; the meta-gradients of all agents in one
  ``vmap`` over agents, one optimizer step over the stack (Adam and SGD are elementwise, so this is K local
  optimizers), and ``W = A^T Phi`` as one (sparse, for sparse graphs) matrix product. Equal to the runtime up
  to floating-point summation order (~1e-15 relative per step in float64).

With ``strategy.overlap`` both engines combine the agents' previous states and add each agent's optimizer step
from its previous state (the per-agent engine through ``Agent.finish_overlapped``, as under torchrun). With
``strategy.staleness`` both combine through each agent's delay line (``gossip/stale.py``), as torchrun's combiners do.

Both engines checkpoint the same state (:meth:`Simulation.state_dict`, per-agent quantities stacked by agent), so
either continues the other's checkpoint.

Size: both engines in one class, because they share the state, checkpoints, departures and evaluation, and are
compared with each other bit for bit.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dif_maml_dist import seeding
from dif_maml_dist.comm.transport import nbytes, ring_all_reduce_bytes
from dif_maml_dist.config import Config
from dif_maml_dist.engine.agent import Agent, InitialModels, initial_params, make_optimizer, set_outer_lr
from dif_maml_dist.engine.figures import Curves
from dif_maml_dist.engine.learner import Learner, interleave_by_agent
from dif_maml_dist.engine.loop import BestCentroid
from dif_maml_dist.gossip.rounds import combine_round
from dif_maml_dist.gossip.schemes import gossip_round, make_gossip
from dif_maml_dist.gossip.stale import make_stale_rounds
from dif_maml_dist.gossip.tolerant import header_bytes
from dif_maml_dist.graphs.membership import declared_degrees, round_weights
from dif_maml_dist.graphs.schedules import GraphSchedule, static_schedule
from dif_maml_dist.graphs.weights import CombinePlan, combine_plan
from dif_maml_dist.learning.batch import TaskBatch
from dif_maml_dist.tasks import TaskFamily

#: Below this density a sparse matrix product is used for the combine (large, sparse graphs).
_SPARSE_BELOW = 0.25
#: Agents per vmap call in the vectorised engine on the CPU: half the network, so that two cores have a chunk each,
#: within these bounds (250 agents per call beat 1000 and 50 on a 2-core CPU; below 32 a second chunk gains
#: nothing); on a GPU, every agent at once (``runtime.agent_chunk`` overrides both). It depends on the network
#: only, never on the machine: the chunks are what the results depend on.
_CPU_AGENT_CHUNK = (32, 256)
#: Agents per evaluation call: their vmap shares the family's ``eval_chunk`` budget of adapted models in flight.
_EVAL_AGENT_CHUNK = 8


def _chunk_pool(threads: Optional[int], num_agents: int, chunk: int) -> Optional[ThreadPoolExecutor]:
    """Threads that compute the vectorised engine's chunks of agents side by side (``runtime.chunk_threads``;
    None: every core this process may use), or None where one thread would do.

    Each thread runs one intra-op thread, so that a chunk's arithmetic, and with it the result, is the same whatever
    the number of threads; and since each chunk is a thread's whole job, a thread descheduled by other work on the
    machine delays its own chunk only. OpenMP's intra-op threads instead meet at a barrier in every operation: on
    a busy machine each waits for a descheduled sibling (``benchmarks/bench_simulator_threads.py``)."""
    chunks = -(-num_agents // chunk)
    threads = min(chunks, threads or len(os.sched_getaffinity(0)))
    if threads <= 1:
        return None
    # The intra-op thread count is per thread (OpenMP's): set in each worker, or it would use every core.
    return ThreadPoolExecutor(threads, thread_name_prefix="agent-chunks", initializer=torch.set_num_threads,
                              initargs=(1,))


class _RoundPlans:
    """One round's weight matrix in the shape ``gossip_round`` reads a schedule: each agent's column."""

    def __init__(self, weights: np.ndarray):
        self.weights = weights

    def plan(self, r: int, agent: int) -> CombinePlan:
        return combine_plan(self.weights, agent)


def sample_agents(samplers: Sequence[Any], gens: Sequence[torch.Generator], num_tasks: int) -> TaskBatch:
    """Every agent's task batch from its own sampler and stream, stacked ``[agents, tasks, ...]``: in one pass
    where the samplers offer it (``sample_agents``), else agent by agent."""
    vectorized = getattr(type(samplers[0]), "sample_agents", None)
    if vectorized is not None and all(type(s) is type(samplers[0]) for s in samplers):
        return vectorized(list(samplers), list(gens), num_tasks)
    batches = [s.sample(g, num_tasks) for s, g in zip(samplers, gens)]
    return TaskBatch(*(torch.stack(parts) for parts in zip(*(b.tensors() for b in batches))))


def _stacked_optimizer(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """K one-parameter optimizers' ``state_dict``s (the per-agent engine's) as the ``state_dict`` of one optimizer
    over the ``[K, P]`` stack (the vectorised engine's): per-parameter tensors stacked, the rest (the step count,
    which every agent shares, a buffer not kept) taken from agent 0."""
    def stack(values: list[Any]) -> Any:
        first = values[0]
        return torch.stack(values) if isinstance(first, Tensor) and first.dim() > 0 else copy.deepcopy(first)

    return {"state": {p: {key: stack([s["state"][p][key] for s in states]) for key in per}
                      for p, per in states[0]["state"].items()},
            "param_groups": copy.deepcopy(states[0]["param_groups"])}


def _agent_optimizer(stacked: dict[str, Any], k: int) -> dict[str, Any]:
    """Agent ``k``'s part of :func:`_stacked_optimizer`'s output (cloned: a view would keep the whole stack)."""
    def part(value: Any) -> Any:
        return value[k].clone() if isinstance(value, Tensor) and value.dim() > 0 else copy.deepcopy(value)

    return {"state": {p: {key: part(v) for key, v in per.items()} for p, per in stacked["state"].items()},
            "param_groups": copy.deepcopy(stacked["param_groups"])}


def _to(obj: Any, device: torch.device) -> Any:
    """``obj``'s tensors (in nested dicts and lists) on ``device``: checkpoints are loaded onto the CPU."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {key: _to(value, device) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to(value, device) for value in obj]
    return obj


def _mixing_operator(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``A^T`` as a tensor, sparse (CSR) on the CPU for sparse graphs."""
    a_t = torch.as_tensor(a.T, dtype=dtype, device=device)
    if np.count_nonzero(a) / a.size < _SPARSE_BELOW and device.type == "cpu":
        with warnings.catch_warnings():  # "sparse CSR support is in beta": a plain product is all we use
            warnings.simplefilter("ignore", UserWarning)
            return a_t.to_sparse_csr()
    return a_t


class Simulation:
    """K agents in lock-step; also the :class:`~dif_maml_dist.engine.loop.Cohort` the simulator mode runs."""

    is_root = True
    networked = True

    def __init__(self, cfg: Config, schedule: GraphSchedule | np.ndarray, device: torch.device | str = "cpu",
                 vectorize: bool = True, family: Optional[TaskFamily] = None):
        """``schedule``: the graphs of every round, or a static weight matrix (the strategy's A, 11^T/K or I);
        ``family``: the task family, if the caller has built it already."""
        self.cfg = cfg
        self.schedule = schedule if isinstance(schedule, GraphSchedule) else static_schedule(schedule)
        self.weights = self.schedule.static_weights
        k = self.weights.shape[0]
        self.num_agents, self.agent_ids = k, tuple(range(k))
        self.device, self.dtype = torch.device(device), getattr(torch, cfg.train.dtype)
        self.vectorize = vectorize
        low, high = _CPU_AGENT_CHUNK
        self.agent_chunk = cfg.runtime.agent_chunk or (min(high, max(low, -(-k // 2))) if self.device.type == "cpu"
                                                       else k)
        self._chunk_pool = _chunk_pool(cfg.runtime.chunk_threads, k, self.agent_chunk) if (
            vectorize and self.device.type == "cpu") else None
        self.learner = Learner.build(cfg, self.device, self.dtype, family, agents=range(k), num_agents=k)
        self.layout = self.learner.layout
        self.model_size = self.learner.model.layout.numel  #: see loop.Cohort
        self.compute_seconds = self.exchange_seconds = 0.0
        self._iteration = 0
        self._message_bytes = nbytes(torch.empty(self.layout.numel, dtype=self.dtype, device="meta"))  # a full state
        self.bytes_sent = [0] * k  #: what each agent would have handed to the network under torchrun
        self._mixers: dict[int, Tensor] = {}
        if vectorize:
            inits = [initial_params(cfg, a, self.dtype, self.device, self.learner.family) for a in range(k)]
            self.params = torch.stack(inits)
            self.optimizer = make_optimizer(cfg.optim, self.params)
            self.tasks = [self.learner.family.sampler(a, k) for a in range(k)]
            self.rngs = [seeding.generator(cfg.seed, seeding.Stream.TASKS, a) for a in range(k)]
            initial = inits.__getitem__
        else:
            initial = InitialModels(cfg, self.dtype, self.device, self.learner.family)
            self.agents = [Agent(cfg, a, k, self.device, self.learner, initial=initial) for a in range(k)]
        # The vectorised engine combines full states with one matrix product; compressed messages go through the
        # same per-agent gossip objects as torchrun's, as does everything in the per-agent engine.
        compressed = cfg.strategy.name == "dif_maml" and cfg.compression.name != "none"
        staleness = cfg.strategy.staleness
        self.gossips = ([make_gossip(cfg, a, initial) for a in range(k)] if compressed or staleness or not vectorize
                        else None)
        #: strategy.staleness: each agent's delay line of received states (gossip/stale.py), as under torchrun
        self.stale = ([make_stale_rounds(a, staleness, cfg.strategy.stale_step, self.weights, initial)
                       for a in range(k)] if staleness else None)
        #: runtime.departures: agent -> the iteration it leaves at; its state stays the one it left with
        self.leave_at = {a: i for a, i in cfg.runtime.departures}
        self._frozen: dict[int, Tensor] = {}
        self._known: frozenset[int] = frozenset()  #: departed agents their neighbours have noticed (a round later)
        # continue mode's messages carry a header (round, degree, membership vector), as under torchrun
        self._header_bytes = header_bytes(k) if cfg.runtime.on_peer_failure == "continue" else 0
        #: the best centroid so far (train.validate; set by the caller's ``on_best``): kept here so that the
        #: checkpoints carry it
        self.best: Optional[BestCentroid] = None

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

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue bit for bit: parameters, optimizer state and task streams of every
        agent, the compressed gossip's reference copies, the departures so far, the counters and the best
        centroid. The same for both engines. Nothing else draws at random across iterations: the graph of a
        round and a compressor's draws come from streams keyed by the round (``graphs/schedules.py``, ``gossip/schemes.py``)."""
        if self.vectorize:
            optimizer, rngs = copy.deepcopy(self.optimizer.state_dict()), self.rngs
        else:
            optimizer = _stacked_optimizer([a.state.optimizer.state_dict() for a in self.agents])
            rngs = [a.state.rng for a in self.agents]
        return {"iteration": self._iteration, "params": self.states().detach().clone(), "optimizer": optimizer,
                "rngs": [g.get_state() for g in rngs],
                # None where the vectorised engine combines by a matrix product, with nothing to keep
                "gossips": None if self.gossips is None else [g.state_dict() for g in self.gossips],
                "stale": None if self.stale is None else [line.state_dict() for line in self.stale],
                "frozen": {a: t.clone() for a, t in self._frozen.items()}, "known": sorted(self._known),
                "bytes_sent": list(self.bytes_sent), "compute_s": self.compute_seconds,
                "exchange_s": self.exchange_seconds, "best": None if self.best is None else self.best.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (of either engine): the next step is the iteration after it."""
        self._iteration = int(sd["iteration"])
        if self.vectorize:
            with torch.no_grad():
                self.params.copy_(sd["params"])
            self.optimizer.load_state_dict(sd["optimizer"])
            for g, state in zip(self.rngs, sd["rngs"]):
                g.set_state(state)
        else:
            for k, agent in enumerate(self.agents):
                agent.state.load_state_dict({"iteration": self._iteration, "params": sd["params"][k],
                                             "optimizer": _agent_optimizer(sd["optimizer"], k), "rng": sd["rngs"][k]})
        if self.gossips is not None and sd["gossips"] is not None:
            for g, state in zip(self.gossips, sd["gossips"]):
                g.load_state_dict(_to(state, self.device))
        if self.stale is not None:
            for line, state in zip(self.stale, sd.get("stale") or [{}] * self.num_agents):
                line.load_state_dict(_to(state, self.device))
        self._frozen = {int(a): t.to(self.device, self.dtype) for a, t in sd["frozen"].items()}
        self._known = frozenset(int(a) for a in sd["known"])
        self.bytes_sent = [int(b) for b in sd["bytes_sent"]]
        self.compute_seconds, self.exchange_seconds = float(sd["compute_s"]), float(sd["exchange_s"])
        self.best = BestCentroid.from_state_dict(sd["best"])

    # -- one iteration -----------------------------------------------------------------------------------
    def _mixer(self, r: int) -> Tensor:
        """Round ``r``'s ``A^T`` (cached for schedules that repeat)."""
        period = self.schedule.period
        key = r % period if period is not None else -1
        if key not in self._mixers or key == -1:
            self._mixers[key] = _mixing_operator(self.schedule.weights(r), self.dtype, self.device)
        return self._mixers[key]

    def _full_state_bytes(self, r: int) -> list[int]:
        return [self.schedule.plan(r, a).degree * (self._message_bytes + self._header_bytes)
                for a in range(self.num_agents)]

    def departed(self, iteration: Optional[int] = None) -> frozenset[int]:
        """The agents gone by ``iteration`` (default: the current one)."""
        it = self._iteration if iteration is None else iteration
        return frozenset(a for a, i in self.leave_at.items() if i <= it)

    def _churn_round(self, r: int, gone: frozenset[int]) -> tuple[_RoundPlans, list[int]]:
        """Round ``r`` among the agents not ``gone``, with the weights their declarations give
        (``membership.round_weights``): those who left since the last round are still declared by their
        neighbours, who notice them missing only now. Also the bytes each agent sends."""
        graph = self.schedule.graph(r)
        a = round_weights(graph, self._known, gone - self._known)
        declared = declared_degrees(graph, self._known)  # a departing agent's neighbours still send to it
        sent = [0 if v in gone else (declared[v] - 1) * (self._message_bytes + self._header_bytes)
                for v in range(self.num_agents)]
        self._known = gone
        return _RoundPlans(a), sent

    def _local_steps(self, grads: Tensor) -> None:
        """Every agent's optimizer step, as one step over the stack (elementwise: K local optimizers)."""
        set_outer_lr(self.optimizer, self.cfg.optim, self._iteration + 1, self.cfg.train.iterations)
        self.params.grad = grads
        self.optimizer.step()
        self.params.grad = None

    def step(self) -> Sequence[Tensor]:
        t0 = time.perf_counter()
        overlap = self.cfg.strategy.overlap
        r = combine_round(self._iteration + 1, self.cfg.strategy.combine_every)
        sent: Optional[list[int]] = None
        gone = self.departed(self._iteration + 1)
        for a in gone - self._frozen.keys():  # leaving now, with the state of the iteration before
            self._frozen[a] = self._state(a).detach().clone()
        churn = None
        if r is not None and self.leave_at and self.cfg.strategy.name == "dif_maml":
            churn, sent = self._churn_round(r, gone)
        if self.vectorize:
            stacked = sample_agents(self.tasks, self.rngs, self.cfg.task.meta_batch).to_device(self.device,
                                                                                                self.dtype)
            # In chunks of agents: one vmap over a thousand agents is 3x slower than four over 250 (cache).
            views = self.layout.split(self.params.detach())
            c = self.agent_chunk
            chunks = [(tuple(v[i:i + c] for v in views), *(t[i:i + c] for t in stacked.tensors()))
                      for i in range(0, self.num_agents, c)]
            # Built for this iteration: an algorithm's objective may change over training (MAML++'s annealing).
            meta_gradients = torch.vmap(self.learner.algorithm.batched(
                self.learner.losses.batched_loss, self._iteration + 1, self.cfg.maml.vmap_chunk))
            if self._chunk_pool is None:
                parts = [meta_gradients(*chunk) for chunk in chunks]
            else:
                parts = list(self._chunk_pool.map(lambda chunk: meta_gradients(*chunk), chunks))
            grads = torch.cat([self.layout.join(g) for g, _ in parts])
            losses = torch.cat([v for _, v in parts])
            if not overlap:
                self._local_steps(grads)
            t1 = time.perf_counter()
            if r is not None:
                with torch.no_grad():
                    if churn is not None:
                        self.params.copy_(_mixing_operator(churn.weights, self.dtype, self.device) @ self.params)
                    elif self.gossips is not None:
                        # rows of the stack, which changes in place: a delay line needs copies
                        phis = self.params.detach().clone() if self.stale else self.params.detach()
                        combined, sent = gossip_round(self.gossips, list(phis), self.schedule, r, self.stale)
                        self.params.copy_(torch.stack(combined))
                    else:
                        self.params.copy_(self._mixer(r) @ self.params)
                        sent = self._full_state_bytes(r)
            if overlap:  # the step from the previous state, added to its combination (Agent.finish_overlapped)
                self._local_steps(grads)
            losses = list(losses.detach())
        elif overlap:
            steps = [a.meta_gradient() for a in self.agents]  # each at w_{k,i-1}, while "the messages travel"
            t1 = time.perf_counter()
            combined = [a.state.params for a in self.agents]
            if r is not None:
                combined, sent = gossip_round(self.gossips, [a.state.params.clone() for a in self.agents],
                                              self.schedule, r)
            for agent, w, (grad, _) in zip(self.agents, combined, steps):
                agent.finish_overlapped(w, grad)
            losses = [loss for _, loss in steps]
        else:
            losses = [a.adapt() for a in self.agents]
            t1 = time.perf_counter()
            if r is not None:
                phis = [a.state.params.clone() for a in self.agents]  # everyone combines the same phi_i
                combined, sent_now = gossip_round(self.gossips, phis, churn or self.schedule, r, self.stale)
                sent = sent if churn is not None else sent_now
                for agent, w in zip(self.agents, combined):
                    agent.set_combined(w)
            else:  # a local step: phi stays
                for agent in self.agents:
                    agent.set_combined(agent.state.params)
        if r is not None:
            if self.cfg.strategy.name == "centralized":  # an all-reduce under torchrun, charged as one
                sent = [ring_all_reduce_bytes(self.num_agents, self._message_bytes)] * self.num_agents
            self.bytes_sent = [b + s for b, s in zip(self.bytes_sent, sent)]
        with torch.no_grad():
            for a in gone:  # a departed agent's model stays as it left (its records keep scoring that model)
                self._state(a).copy_(self._frozen[a])
        self.compute_seconds += t1 - t0
        self.exchange_seconds += time.perf_counter() - t1
        self._iteration += 1
        return losses

    # -- Cohort interface (see loop.py) ------------------------------------------------------------------
    def counters(self, i: int) -> dict[str, float]:
        # Time is the whole simulation's (agents are not separable when vectorised); bytes are what agent i
        # would send under torchrun.
        return {"compute_s": self.compute_seconds, "exchange_s": self.exchange_seconds,
                "bytes_sent": self.bytes_sent[i]}

    def shared_curves(self, params: Tensor, max_steps: int, final: bool = False, validation: bool = False) -> Curves:
        learner, params = self.learner, params.to(self.device, self.dtype)
        if learner.held_out_per_agent and not validation:  # the union of the agents' shares, as under torchrun
            parts = [learner.held_out_share_curves(params, max_steps, final, a)
                     for a in range(self.num_agents)]
            return interleave_by_agent(parts, learner.family.metric is not None)
        return learner.curves(params, max_steps, 0, learner.num_tests(final, validation),
                              validation=validation)

    def agent_curves(self, max_steps: int, final: bool = False) -> list[Curves]:
        if not self.vectorize or self.learner.held_out_per_agent:  # agent after agent (each on its own tasks)
            return [self.learner.test_curves(self._state(i).to(self.device, self.dtype),
                                             max_steps, final, agent=i) for i in range(self.num_agents)]
        # Agents holding the same model are evaluated once: all of them at a shared start, and every agent of the
        # centralized baseline at every evaluation.
        states, owner = torch.unique(self.params.detach(), dim=0, return_inverse=True)
        # All agents adapt the same test tasks: one vmap over agents (of the vmap over tasks), a chunk of agents
        # at a time so that the agents x tasks adapted models in flight stay within the family's budget.
        distinct: list[Curves] = []
        for a in range(0, states.shape[0], _EVAL_AGENT_CHUNK):
            losses, scores = self.learner.test_curves(states[a:a + _EVAL_AGENT_CHUNK],
                                                      max_steps, final, over_agents=True)
            distinct += [(losses[j], None if scores is None else scores[j]) for j in range(losses.shape[0])]
        return [distinct[int(i)] for i in owner]

    def all_states(self) -> Tensor:
        """The agents still in the network (all of them without departures): the centroid is theirs."""
        states = self.states().detach().cpu()
        gone = self.departed()
        return states[[a for a in range(self.num_agents) if a not in gone]] if gone else states

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        return items

    def union(self, ids: list[int]) -> list[int]:
        return sorted(ids)

    def nonfinite(self) -> list[int]:
        finite = torch.isfinite(self.states().detach()).all(dim=1)
        return [int(k) for k in torch.nonzero(~finite).flatten()]

    def named_params(self, params: Tensor) -> dict[str, Tensor]:
        return self.layout.unflatten(params)
