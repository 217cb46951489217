"""One agent in its own process, as the training loop sees it (``loop.Cohort``): the agent plus what its
evaluations need from the others.

- :class:`AgentCohort`: a torchrun agent of a network that stops when a member fails; evaluations split the
  test tasks over the ranks and gather them (collectives on the transport, off the training path).
- :class:`LiveAgentCohort`: an agent of a network that goes on without its departed members
  (``runtime.on_peer_failure=continue``): nothing here waits for another agent. Its evaluations are its own
  model's; at every evaluation it hands a snapshot of its parameters to ``snapshot`` (the run writes it to
  ``snapshots/agent<k>/iter<N>.pt``), from which the network's figures are computed after the fact
  (``run/summary.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from dif_maml_dist.comm.transport import Transport
from dif_maml_dist.engine.agent import Agent
from dif_maml_dist.engine.figures import Curves
from dif_maml_dist.engine.learner import interleave_by_agent

log = logging.getLogger(__name__)


class _OneAgent:
    """What both cohorts share: one agent, its loop state and its counters (``transport``: whatever counts the
    bytes it sends, their one owner)."""

    def __init__(self, agent: Agent, transport: Any):
        self.agent, self.transport = agent, transport
        self.cfg = agent.cfg
        self.agent_ids = (agent.rank,)
        self.model_size = agent.learner.model.layout.numel  #: see loop.Cohort

    @property
    def iteration(self) -> int:
        return self.agent.state.iteration

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of this process holds: the agent's loop state and the transport's counters (the
        bytes it has sent: the transport is their one owner)."""
        return {**self.agent.state_dict(), **self.transport.counters()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.agent.load_state_dict(sd)
        self.transport.restore_counters(sd)

    def step(self) -> list[Tensor]:
        return [self.agent.step()]

    def counters(self, i: int) -> dict[str, float]:
        return {"compute_s": self.agent.compute_seconds, "exchange_s": self.agent.exchange_seconds,
                "bytes_sent": self.transport.bytes_sent}

    def agent_curves(self, max_steps: int, final: bool = False) -> list[Curves]:
        return [self.agent.learner.test_curves(self.agent.state.params, max_steps, final,
                                               agent=self.agent.rank)]

    def nonfinite(self) -> list[int]:
        return [] if bool(torch.isfinite(self.agent.state.params).all()) else [self.agent.rank]


class AgentCohort(_OneAgent):
    """One agent in its own process, with collectives over every agent for its evaluations (module doc)."""

    networked = True  #: see loop.Cohort

    def __init__(self, agent: Agent, transport: Transport):
        super().__init__(agent, transport)
        self.is_root = transport.rank == 0

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
        params = params.to(learner.device, learner.dtype)
        if learner.held_out_per_agent and not validation:
            # Each rank adapts the centroid on its own agent's share of the held-out tasks: no rank reads another
            # agent's data, and the union does not depend on which process hosts which agent.
            own = learner.held_out_share_curves(params, max_steps, final, self.agent.rank)
            parts = self.transport.all_gather_object(tuple(None if c is None else c.cpu() for c in own))
            return interleave_by_agent(parts, learner.family.metric is not None)
        n = learner.num_tests(final, validation)
        start, stop = n * rank // world, n * (rank + 1) // world
        losses, scores = learner.curves(params, max_steps, start, stop, validation=validation)
        # Every rank gets every slice (the gather is an all-gather): all of them see the same figures, so they can
        # make the same decisions from them (the best model by validation accuracy).
        parts = self.transport.all_gather_object((losses.cpu(), None if scores is None else scores.cpu()))
        return (torch.cat([p[0] for p in parts]), None if scores is None else torch.cat([p[1] for p in parts]))

    def union(self, ids: list[int]) -> list[int]:
        return sorted({i for part in self.transport.all_gather_object(ids) for i in part})


class LiveAgentCohort(_OneAgent):
    """One agent of a network that goes on without its departed members (module doc)."""

    networked = False  #: run_loop: no centroid or disagreement during the run (run/summary.py makes them)
    is_root = False  #: no agent writes network records: rank 0 is not special

    def __init__(self, agent: Agent, transport: Any, snapshot: Callable[[int, dict[str, Tensor]], None],
                 leave_at: Optional[int] = None):
        """``snapshot(iteration, named_params)``: keeps an evaluation's parameters for the network's figures;
        ``leave_at``: the iteration at which this agent leaves (``runtime.departures``)."""
        super().__init__(agent, transport)
        self._snapshot, self.leave_at = snapshot, leave_at

    def step(self) -> list[Tensor]:
        if self.leave_at is not None and self.iteration + 1 == self.leave_at:
            # As a crash would: no goodbye, the sockets close with the process. Status 0, so that a single
            # torchrun node does not stop the others (it stops them all when a worker fails).
            log.warning("leaving the network before iteration %d (runtime.departures)", self.leave_at)
            logging.shutdown()
            os._exit(0)
        return super().step()

    def snapshot(self) -> None:
        self._snapshot(self.iteration, {n: t.detach().cpu() for n, t in self.agent.named_params().items()})

    # An agent decides alone: a NaN is its own, and it leaves the network like any departed agent.
    def union(self, ids: list[int]) -> list[int]:
        return sorted(ids)

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        return None

    def all_states(self) -> Tensor:
        raise AssertionError("continue mode computes no network figures during the run")

    def shared_curves(self, *args, **kwargs):
        raise AssertionError("continue mode computes no network figures during the run")
