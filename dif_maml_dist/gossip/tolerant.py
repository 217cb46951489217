"""Training through departures (``runtime.on_peer_failure=continue``): the combine step that drops neighbours
which do not answer and takes back those that return.

:class:`TolerantCombiner` replaces ``combiners.NeighborCombiner``: each round it exchanges with the neighbours it
believes alive, every message with a small header (round, declared degree, membership vector); the neighbours
that did not answer are marked departed, the weights come from the declarations (``graphs.membership.churn_plan``),
and the full-state combine of ``combine.py`` merges what arrived. Its agent runs in ``engine.cohorts.
LiveAgentCohort``, whose evaluations need no other agent.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import networkx as nx
import torch
from torch import Tensor

from dif_maml_dist.comm.edges import TolerantTransport
from dif_maml_dist.comm.liveness import PeerError
from dif_maml_dist.comm.transport import nbytes
from dif_maml_dist.gossip.combine import combine
from dif_maml_dist.gossip.rounds import combine_round
from dif_maml_dist.graphs.membership import Membership, churn_plan
from dif_maml_dist.graphs.schedules import GraphSchedule
from dif_maml_dist.messages import first_line

log = logging.getLogger(__name__)

#: header layout: [round, declared degree, membership vector...], int64
_ROUND, _DEGREE, _STATES = 0, 1, 2


def header_bytes(num_agents: int) -> int:
    """The bytes of the header every continue-mode message carries (what the simulator counts for it too)."""
    return nbytes(torch.empty(_STATES + num_agents, dtype=torch.int64))


class TolerantCombiner:
    """Dif-MAML's full-state combine over the neighbours still alive (module doc), taking back neighbours that
    come back.

    Coming back. A restarted agent asks through the store; a live neighbour answers at a round boundary by
    forming a new edge with it and sending it (a *welcome*) its round, its view of the network and its current
    parameters (``edges.EdgeTransport`` agrees with the returning end on the round from which both exchange).
    The agent takes the first welcome's parameters and round, so it re-enters in step with the network; later
    welcomes (neighbours that answer later) add their edge from the round agreed on it."""

    def __init__(self, agent: int, schedule: GraphSchedule, transport: TolerantTransport, membership: Membership,
                 every: int = 1):
        self.agent, self.schedule, self.transport, self.every = agent, schedule, transport, every
        self.membership = membership
        #: neighbours that came back: the round from which this agent exchanges with each (agreed on the new edge)
        self.start: dict[int, int] = {}

    def _header(self, r: int, degree: int) -> Tensor:
        return torch.tensor([r, degree, *self.membership.vector()], dtype=torch.int64)

    def rejoin(self, params: Tensor) -> Optional[int]:
        """A restarted agent's re-entry: ask the neighbours, wait (at most twice ``runtime.timeout_s``) until one
        takes it back, take that neighbour's parameters into ``params``, its view of the network and its round;
        returns the iteration to continue from (None without neighbours). Neighbours that answer later join at a round agreed with each."""
        t = self.transport
        if not t.peers:  # nobody to ask: an agent without neighbours continues from its own checkpoint
            return None
        t.rejoin(self._header(0, 0), params)
        deadline = time.monotonic() + 2 * t.timeout_s
        formed: list = []
        first = None
        # Until the edge whose welcome this agent adopted has formed (the adopting thread hands it over last).
        while first is None and time.monotonic() < deadline and t.forming:
            time.sleep(0.01)
            formed += t.formed()
            first = next(((p, box) for p, box in formed if box["params"] is not None), None)
        if first is None:
            took = {p for p, _ in formed}
            why = "; ".join(f"agent {p}: {t.form_errors.get(p) or 'no answer yet'}" for p in t.peers if p not in took)
            raise PeerError(f"agent {self.agent} restarted, but no neighbour ({', '.join(map(str, t.peers))}) took it "
                            f"back within {2 * t.timeout_s:g} s (2 x runtime.timeout_s): "
                            f"{why or 'are they still running?'}")
        with torch.no_grad():
            params.copy_(first[1]["params"].to(params.device))
        self.membership.adopt(first[1]["header"][_STATES:].tolist())
        self._greet(formed)
        return first[1]["start"] * self.every

    def _greet(self, formed) -> None:
        for p, box in formed:  # edges this agent asked for: the neighbour's view merged, its start round kept
            r = int(box["header"][_ROUND])
            self.membership.absorb(r, (r + 1) * self.every, {}, {p: box["header"][_STATES:].tolist()})
            self.start[p] = box["start"]

    def _dropped(self, by: int) -> None:
        raise PeerError(f"agent {self.agent} was dropped by the network (agent {by} reports it departed after it did "
                        f"not answer within runtime.timeout_s); restart it to rejoin", by)

    def _admit(self, phi: Tensor, r: int, iteration: int) -> None:
        """At a round boundary: answer neighbours that came back; take in the edges that formed."""
        t = self.transport
        t.enter(r)
        dropped_by = t.poll_joins([p for p in t.peers if p not in t.groups])
        if dropped_by is not None:
            self._dropped(dropped_by)
        formed = t.formed()
        self._greet([(p, box) for p, box in formed if box["incarnation"] is None])
        for p, box in formed:
            if box["incarnation"] is not None:  # this agent gives p its state; both exchange from the agreed round
                try:
                    self.start[p] = t.welcome(p, self._header(r, 0), phi)
                except RuntimeError as err:  # it died again while coming back: stays departed
                    log.warning("agent %d did not take its welcome (%s)", p, first_line(err, 200))
                    t.drop(p)
                    continue
                self.membership.welcome(p, box["incarnation"], r, iteration)

    def __call__(self, phi: Tensor, iteration: int) -> Tensor:
        r = combine_round(iteration, self.every)
        if r is None:
            return phi
        members = self.membership
        self._admit(phi, r, iteration)
        groups = self.transport.groups
        peers = [p for p in self.schedule.plan(r, self.agent).neighbors
                 if members.is_live(p) and p in groups and self.start.get(p, 0) <= r]
        degree = len(peers) + 1
        t0 = time.perf_counter()
        received, headers, failed = self.transport.exchange_tolerant({p: phi for p in peers},
                                                                     self._header(r, degree))
        waited = time.perf_counter() - t0
        for p, h in list(headers.items()):
            if int(h[_ROUND]) != r:  # out of step (it missed rounds while hung): not this round's state
                failed[p] = f"its message was for round {int(h[_ROUND])}, this agent is at round {r}"
                del received[p], headers[p]
                self.transport.drop(p)
        for p in failed:
            if members.is_live(p):
                self.transport.report_departed(p, members.incarnation_of(p))
        dropped_by = members.absorb(r, iteration, failed, {p: h[_STATES:].tolist() for p, h in headers.items()},
                                    waited)
        if dropped_by is not None:
            self._dropped(dropped_by)
        plan = churn_plan(self.agent, degree, {p: int(h[_DEGREE]) for p, h in headers.items()})
        return combine(plan, phi, received)

    def view(self, graph: nx.Graph) -> dict:
        return self.membership.view(graph)

    def settle(self) -> None:  # every round is waited on within its iteration
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"membership": self.membership.vector()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if "membership" in sd:
            self.membership.states = list(sd["membership"])
