"""An agent's Combine step as one object, the :class:`Combiner` the agent receives: what the strategy does with
the Adapt step's output ``phi`` at the end of each iteration.

- :class:`NeighborCombiner` (``dif_maml``): this agent's gossip scheme (``schemes.py``) over the transport, on
  the graph of each round (``graphs/schedules.py``);
- :class:`MeanCombiner` (``centralized``): an all-reduce mean, ``A = 11^T/K``;
- :class:`NoCombiner` (``noncooperative``): ``A = I``, nothing is sent;
- ``tolerant.TolerantCombiner`` (``dif_maml`` with ``runtime.on_peer_failure=continue``): the full-state combine
  over the neighbours still alive.

Which iterations combine is ``rounds.combine_round``'s to say. The first three can also *post* a round
(``strategy.overlap``): the messages leave at once and the combined state is computed when the caller waits, so
the exchange runs while the agent computes its meta-gradient (``engine/agent.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import networkx as nx
from torch import Tensor

from dif_maml_dist.comm.transport import Pending, Transport, done
from dif_maml_dist.config import Config
from dif_maml_dist.gossip.rounds import combine_round
from dif_maml_dist.gossip.schemes import Gossip, make_gossip
from dif_maml_dist.gossip.stale import StaleRounds, make_stale_rounds
from dif_maml_dist.graphs.membership import Membership
from dif_maml_dist.graphs.schedules import GraphSchedule


class Combiner(Protocol):
    """One agent's Combine step (module doc). The agent calls it once per iteration and checkpoints its state."""

    def __call__(self, phi: Tensor, iteration: int) -> Tensor:
        """The combined state ``w`` for iteration ``iteration`` (1-based) from this agent's ``phi``; ``phi`` itself
        in a local step (``strategy.combine_every``)."""

    def post(self, state: Tensor, iteration: int) -> Pending[Tensor]:
        """The same round started and left in flight (``strategy.overlap``; not every combiner has it: config
        validation refuses the others)."""

    def settle(self) -> None:
        """Wait for every round still in flight (``strategy.staleness``); called after the last iteration."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...

    def rejoin(self, params: Tensor) -> Optional[int]:
        """A restarted agent's way back into the running network: the neighbours' current state copied into
        ``params``, and the iteration to continue from; ``None`` for a combiner with nobody to ask."""

    def view(self, graph: nx.Graph) -> dict:
        """This agent's view of who took part (``Membership.view``), for its summary."""


class _EveryoneStays:
    """The part of the protocol for combiners whose network never changes: nobody departs, nobody rejoins; and
    a round can be posted and waited on later (:meth:`post`), of which ``__call__`` is the synchronous form."""

    members: Membership
    #: start iteration ``iteration``'s round with this agent's ``state`` (which must stay unchanged until the
    #: round has been waited on); waiting gives the combined state
    post: Callable[[Tensor, int], Pending[Tensor]]

    def __call__(self, phi: Tensor, iteration: int) -> Tensor:
        return self.post(phi, iteration).wait()

    def rejoin(self, params: Tensor) -> Optional[int]:
        return None

    def settle(self) -> None:
        pass

    def view(self, graph: nx.Graph) -> dict:
        return self.members.view(graph)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


class NeighborCombiner(_EveryoneStays):
    """Dif-MAML in one process: this agent's gossip over the transport, on the schedule's graph of each round."""

    def __init__(self, agent: int, schedule: GraphSchedule, gossip: Gossip, transport: Transport, every: int = 1,
                 stale: Optional[StaleRounds] = None):
        """``stale``: the delay line of ``strategy.staleness`` (None: each round waits for its own messages)."""
        self.agent, self.schedule, self.gossip, self.transport, self.every = agent, schedule, gossip, transport, every
        self.stale = stale
        self.members = Membership(agent, schedule.num_agents)

    def post(self, state: Tensor, iteration: int) -> Pending[Tensor]:
        r = combine_round(iteration, self.every)
        if r is None:
            return done(state)
        plan = self.schedule.plan(r, self.agent)
        if self.stale is not None:
            # waited on s iterations later, after the state has changed: the messages are a copy
            sent = state.detach().clone()
            return self.stale.combine(sent, self.transport.post_exchange(self.gossip.outgoing(sent, plan, r), r),
                                      plan, state)
        pending = self.transport.post_exchange(self.gossip.outgoing(state, plan, r), r)
        return Pending(lambda: self.gossip.merge(state, pending.wait(), plan, r))

    def settle(self) -> None:
        if self.stale is not None:
            self.stale.settle()

    def state_dict(self) -> dict[str, Any]:
        sd = self.gossip.state_dict()
        return sd if self.stale is None else {**sd, "stale": self.stale.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gossip.load_state_dict({key: value for key, value in sd.items() if key != "stale"})
        if self.stale is not None:
            self.stale.load_state_dict(sd.get("stale", {}))


class MeanCombiner(_EveryoneStays):
    """Centralized baseline: ``A = 11^T/K``, an all-reduce mean over every agent (every ``every``-th iteration)."""

    def __init__(self, agent: int, num_agents: int, transport: Transport, every: int = 1):
        self.transport, self.every = transport, every
        self.members = Membership(agent, num_agents)

    def post(self, state: Tensor, iteration: int) -> Pending[Tensor]:
        r = combine_round(iteration, self.every)
        return done(state) if r is None else self.transport.post_all_reduce_mean(state, r)


class NoCombiner(_EveryoneStays):
    """Non-cooperative baseline: ``A = I``, nothing is sent (``incarnation``: this process's start, for its
    view)."""

    def __init__(self, agent: int, num_agents: int, incarnation: int = 0):
        self.members = Membership(agent, num_agents, incarnation)

    def post(self, state: Tensor, iteration: int) -> Pending[Tensor]:
        return done(state)


def _dif_maml(cfg: Config, schedule: GraphSchedule, agent: int, transport: Any,
              initial: Callable[[int], Tensor]) -> Combiner:
    if cfg.runtime.on_peer_failure == "continue":
        from dif_maml_dist.gossip.tolerant import TolerantCombiner

        members = Membership(agent, schedule.num_agents, transport.incarnation)
        return TolerantCombiner(agent, schedule, transport, members, cfg.strategy.combine_every)
    s = cfg.strategy
    stale = make_stale_rounds(agent, s.staleness, s.stale_step, schedule.static_weights, initial)
    return NeighborCombiner(agent, schedule, make_gossip(cfg, agent, initial), transport, cfg.strategy.combine_every,
                            stale)


#: strategy name -> its combiner, as ``make_combiner`` builds it (config validation reads the names from here)
STRATEGIES: dict[str, Callable[..., Combiner]] = {
    "dif_maml": _dif_maml,
    "centralized": lambda cfg, schedule, agent, transport, initial: MeanCombiner(
        agent, schedule.num_agents, transport, cfg.strategy.combine_every),
    "noncooperative": lambda cfg, schedule, agent, transport, initial: NoCombiner(
        agent, schedule.num_agents, getattr(transport, "incarnation", 0)),
}


def make_combiner(cfg: Config, schedule: GraphSchedule, agent: int, transport: Any,
                  initial: Callable[[int], Tensor]) -> Combiner:
    """Agent ``agent``'s combine step for ``cfg.strategy`` over ``transport`` (a ``comm.Transport``; with
    ``runtime.on_peer_failure=continue``, a ``comm.TolerantTransport``); ``initial(l)``: agent l's initial model."""
    return STRATEGIES[cfg.strategy.name](cfg, schedule, agent, transport, initial)
