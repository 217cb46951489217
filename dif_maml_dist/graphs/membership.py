"""Who is still in the network, as each agent sees it, and the weights of a round without a coordinator
(``runtime.on_peer_failure=continue``). Pure: no torch.distributed, no processes.

Weights. Every message of a round carries its sender's *declared degree* ``n_l``: 1 + the number of round
neighbours the sender believed alive when the round began. Agent k gives each neighbour l that answered
``a_lk = 1 / max(n_k, n_l)`` and keeps the rest, ``a_kk = 1 - sum``. Both ends of an edge compute the same number
from the same two declarations, so the round's matrix restricted to the agents that took part is symmetric with
columns summing to one: doubly stochastic on the surviving graph, whoever left. Before anyone leaves, the
declarations are the graph's own degrees and the weights are exactly the Metropolis matrix (``weights.py``).
A neighbour that died during the round is simply not among those that answered: its share goes to the agent
itself (the declarations of that round still counted it, which keeps both ends in agreement).

Membership. Each agent keeps one integer per agent, ``2 * incarnation + departed``; messages carry the vector
and receivers take the element-wise maximum (a grow-only merge: the same result in any order). An agent's
neighbours mark it departed in the round its message fails to arrive (a closed socket at once, a hung peer after
``runtime.timeout_s``); every other agent learns it one hop per round, so within ``d`` rounds of the detection,
``d`` its distance to a detecting neighbour in the surviving graph. From the departed set and the base graph
each agent derives its component of the surviving graph, so a split graph is seen from both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import networkx as nx
import numpy as np

from dif_maml_dist.graphs.weights import CombinePlan


def churn_plan(agent: int, own_degree: int, answered: Mapping[int, int]) -> CombinePlan:
    """Agent ``agent``'s column of the round's weights from the declared degrees: its own ``own_degree`` and
    ``answered[l]`` of each neighbour whose message arrived (see the module doc)."""
    neighbors = tuple(sorted(answered))
    weights = tuple(1.0 / max(own_degree, answered[l]) for l in neighbors)
    total = 0.0
    for w in weights:  # ascending neighbour order, as metropolis_weights' column sum: the same float
        total += w
    return CombinePlan(agent, 1.0 - total, neighbors, weights)


def surviving_graph(graph: nx.Graph, departed: Iterable[int]) -> nx.Graph:
    """``graph`` with every edge of a departed agent removed (the departed stay as isolated nodes)."""
    gone = set(departed)
    g = nx.Graph()
    g.add_nodes_from(graph.nodes)
    g.add_edges_from((u, v) for u, v in graph.edges if u not in gone and v not in gone)
    return g


def declared_degrees(graph: nx.Graph, known: Iterable[int]) -> dict[int, int]:
    """Each agent's declared degree in a round over ``graph`` when the agents in ``known`` are known to have left:
    1 + its neighbours not among them."""
    known = set(known)
    return {v: 1 + sum(1 for u in graph.neighbors(v) if u not in known) for v in graph.nodes}


def round_weights(graph: nx.Graph, known: Iterable[int], leaving: Iterable[int] = ()) -> np.ndarray:
    """The matrix that agents computing :func:`churn_plan` arrive at in a round over ``graph`` (the round's
    graph), when the agents in ``known`` had departed before the round and those in ``leaving`` leave during it
    (their neighbours still declared them). Departed agents keep their state (``a_mm = 1``). The simulator's
    reference for the torchrun agents' local weights."""
    known, leaving = set(known), set(leaving)
    k = graph.number_of_nodes()
    declared = declared_degrees(graph, known)
    a = np.zeros((k, k))
    for u, v in graph.edges:
        if not ({u, v} & (known | leaving)):
            a[u, v] = a[v, u] = 1.0 / max(declared[u], declared[v])
    a[np.diag_indices(k)] = 1.0 - a.sum(axis=0)
    return a


def components(graph: nx.Graph, departed: Iterable[int]) -> list[list[int]]:
    """The connected components of the surviving graph among the agents not departed, each sorted, largest
    first (ties: lowest agent first)."""
    gone = set(departed)
    g = surviving_graph(graph, gone).subgraph(v for v in graph.nodes if v not in gone)
    parts = [sorted(c) for c in nx.connected_components(g)]
    return sorted(parts, key=lambda c: (-len(c), c[0]))


@dataclass(frozen=True)
class Departure:
    """One agent's record of another's departure."""

    agent: int  #: who left
    round: int  #: the combination round in which this agent learned it
    iteration: int  #: the training iteration that round completes
    how: str  #: "no message" (a neighbour that did not answer) or "told by agent l" (learned from a message)
    reason: str = ""  #: the transport's words, for a neighbour that did not answer
    waited_s: Optional[float] = None  #: how long the round that found a silent neighbour took (its exchange)

    def record(self) -> dict:
        return {"agent": self.agent, "round": self.round, "iteration": self.iteration, "how": self.how,
                **({"reason": self.reason} if self.reason else {}),
                **({"waited_s": self.waited_s} if self.waited_s is not None else {})}


@dataclass(frozen=True)
class Return:
    """One agent's record of another coming back (a restarted process with a new incarnation)."""

    agent: int
    incarnation: int
    round: int  #: the combination round in which this agent learned it
    iteration: int
    how: str  #: "welcomed" (this agent gave it its parameters) or "told by agent l"

    def record(self) -> dict:
        return {"agent": self.agent, "incarnation": self.incarnation, "round": self.round,
                "iteration": self.iteration, "how": self.how}


@dataclass
class Membership:
    """One agent's view of who is in the network (the one owner of it): the merged state vector and the
    departures this agent learned of, in order."""

    agent: int
    num_agents: int
    incarnation: int = 0
    states: list[int] = field(default_factory=list)  #: per agent: 2 * incarnation + departed
    departures: list[Departure] = field(default_factory=list)
    returns: list[Return] = field(default_factory=list)

    def __post_init__(self):
        if not self.states:
            self.states = [0] * self.num_agents
        self.states[self.agent] = 2 * self.incarnation

    def is_live(self, peer: int) -> bool:
        return self.states[peer] % 2 == 0

    def incarnation_of(self, peer: int) -> int:
        """The start of ``peer`` this agent last heard of (0: its first)."""
        return self.states[peer] // 2

    @staticmethod
    def merged(vectors: Iterable[Sequence[int]], num_agents: int) -> list[int]:
        """Several agents' views merged, as messages merge them (element-wise maximum)."""
        states = [0] * num_agents
        for vector in vectors:
            states = [max(a, b) for a, b in zip(states, vector)]
        return states

    @staticmethod
    def departed_in(vector: Sequence[int]) -> list[int]:
        """The agents a state vector (``vector()``, as recorded in an agent's final file) marks departed."""
        return [p for p, s in enumerate(vector) if s % 2 == 1]

    @property
    def departed(self) -> list[int]:
        return self.departed_in(self.states)

    def vector(self) -> list[int]:
        return list(self.states)

    def absorb(self, round: int, iteration: int, failed: Mapping[int, str],
               heard: Mapping[int, Sequence[int]], waited_s: Optional[float] = None) -> Optional[int]:
        """After round ``round`` (whose exchange took ``waited_s``): the neighbours in ``failed`` (peer -> why)
        departed; merge the state vectors ``heard`` from the others. Returns the neighbour that reports this agent
        itself departed (it was dropped after not answering in time), or None."""
        for p in sorted(failed):
            if self.is_live(p):
                self.states[p] |= 1
                self.departures.append(Departure(p, round, iteration, "no message", failed[p], waited_s))
        dropped_by = None
        for sender in sorted(heard):
            vector = heard[sender]
            for p, s in enumerate(vector):
                if p == self.agent:
                    if s > self.states[p]:
                        dropped_by = sender
                    continue
                if s > self.states[p]:
                    was_live = self.is_live(p)
                    self.states[p] = s
                    if was_live and s % 2 == 1:
                        self.departures.append(Departure(p, round, iteration, f"told by agent {sender}"))
                    elif not was_live and s % 2 == 0:
                        self.returns.append(Return(p, s // 2, round, iteration, f"told by agent {sender}"))
        return dropped_by

    def welcome(self, peer: int, incarnation: int, round: int, iteration: int) -> None:
        """``peer`` came back as ``incarnation`` and this agent gave it its state."""
        self.states[peer] = max(self.states[peer], 2 * incarnation)
        self.returns.append(Return(peer, incarnation, round, iteration, "welcomed"))

    def adopt(self, vector: Sequence[int]) -> None:
        """This agent came back: the welcoming neighbour's view, with this agent's own new incarnation."""
        self.states = [max(a, b) for a, b in zip(self.states, vector)]
        self.states[self.agent] = 2 * self.incarnation

    def view(self, graph: nx.Graph) -> dict:
        """What the summary records of this agent's view: the departures it learned of and its component."""
        comps = components(graph, self.departed)
        mine = next((c for c in comps if self.agent in c), [self.agent])
        return {"departures": [d.record() for d in self.departures], "returns": [r.record() for r in self.returns],
                "departed": self.departed, "component": mine, "incarnation": self.incarnation,
                "states": self.vector()}
