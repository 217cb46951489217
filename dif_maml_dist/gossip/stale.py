"""Bounded staleness (``strategy.staleness=s``): round ``r`` corrects this agent's fresh state by the disagreement
the agents had ``s`` rounds before,

    w_{k,i} = phi_{k,i} + gamma * sum_l a_lk (phi_{l,i-s} - phi_{k,i-s})     (phi_{l,j} = w_{l,0} for j <= 0),

so a message has ``s`` iterations to arrive before anyone waits for it: on a link whose latency exceeds an
iteration's compute, the network runs up to ``s`` times faster than a synchronous exchange can. The delay is
fixed, not "whatever has arrived": every run is then one deterministic recursion, which the simulator computes
too and torchrun matches bit for bit.

Why the correction form, not ``a_kk phi_{k,i} + sum_{l != k} a_lk phi_{l,i-s}``: averaging a fresh state with stale
ones drags every agent back towards where its neighbours were s steps ago, which slows the network's progress per
iteration by a factor 1 + (1 - a_kk) s. A correction computed from equally old states is zero while the agents
move together, and with a doubly-stochastic A the corrections cancel in the network sum: the average follows
ATC's centroid recursion exactly. The price is a delayed consensus: each disagreement mode ``c = 1 - lambda(A)``
obeys ``x_{i+1} = x_i - gamma c x_{i-s}``, stable exactly when ``gamma c < 2 cos(s pi / (2s + 1))`` (Levin & May
1976; Kuruklis 1994), hence :func:`stale_step`.

:class:`StaleRounds` is the delay line: the agent's own sent states and its neighbours' messages of the last
``s`` rounds, the latter still in flight (torchrun) or delivered (the simulator). One per agent, shared by
``combiners.NeighborCombiner`` and the simulator's ``gossip_round``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Optional

import numpy as np
from torch import Tensor

from dif_maml_dist.comm.transport import Pending, done
from dif_maml_dist.gossip.combine import combine
from dif_maml_dist.graphs.weights import CombinePlan

#: the default step's share of the largest stable one (a margin for rounding and for the mode at the boundary)
STEP_MARGIN = 0.9


def stale_step(weights: np.ndarray, staleness: int, step: Optional[float] = None) -> float:
    """The consensus step gamma for delay ``staleness`` on weights ``weights``: ``step`` if given, else
    ``STEP_MARGIN`` times the largest stable one, ``2 cos(s pi / (2s + 1)) / (1 - lambda_min(A))``, at most 1."""
    if step is not None:
        return step
    lam_min = float(np.linalg.eigvalsh((weights + weights.T) / 2).min())
    return min(1.0, STEP_MARGIN * 2 * math.cos(staleness * math.pi / (2 * staleness + 1)) / (1 - lam_min))


def stale_combine(plan: CombinePlan, phi: Tensor, own_then: Tensor, received_then: dict[int, Tensor],
                  step: float) -> Tensor:
    """``phi + step * (sum_l a_lk phi_{l,then} - phi_{k,then})``: the fresh state corrected by an old round's
    combine (``combine.combine``'s terms and order)."""
    return phi + step * (combine(plan, own_then, received_then) - own_then)


class StaleRounds:
    """Agent ``agent``'s rounds in flight, oldest first: what it sent and what it receives. ``initial(l)``: agent
    l's initial model, which stands for its states before round 0."""

    def __init__(self, agent: int, staleness: int, step: float, initial: Callable[[int], Tensor]):
        assert staleness >= 1, "staleness 0 is the synchronous exchange: no delay line"
        self.agent, self.staleness, self.step, self.initial = agent, staleness, step, initial
        self._rounds: deque[tuple[Tensor, Pending[dict[int, Tensor]]]] = deque()

    def combine(self, sent: Tensor, arrival: Pending[dict[int, Tensor]], plan: CombinePlan,
                phi: Tensor) -> Pending[Tensor]:
        """This round: ``sent`` (the state sent, a copy that stays unchanged) and its neighbours' messages
        ``arrival`` join the line; waiting gives ``phi`` corrected by the round ``s`` before (the initial models in
        the first ``s`` rounds)."""
        self._rounds.append((sent, arrival))
        if len(self._rounds) > self.staleness:
            own, oldest = self._rounds.popleft()
        else:
            own = self.initial(self.agent).to(phi.device, phi.dtype)
            oldest = done({p: self.initial(p).to(phi.device, phi.dtype) for p in plan.neighbors})
        # restored from a checkpoint, the line's states are on the CPU
        return Pending(lambda: stale_combine(plan, phi, own.to(phi.device),
                                             {p: t.to(phi.device) for p, t in oldest.wait().items()}, self.step))

    def settle(self) -> list[tuple[Tensor, dict[int, Tensor]]]:
        """Wait for every round in flight (at a checkpoint, and after the last iteration, so that no transfer is
        left running when the process group goes); the rounds stay queued, delivered. Returns them, oldest
        first."""
        arrived = [(own, pending.wait()) for own, pending in self._rounds]
        self._rounds = deque((own, done(messages)) for own, messages in arrived)
        return arrived

    def state_dict(self) -> dict[str, Any]:
        # The states in the line are part of the recursion's state: without them a resumed run would correct by
        # other states for s rounds.
        return {"rounds": [{"sent": own.clone(), "received": {p: t.clone() for p, t in messages.items()}}
                           for own, messages in self.settle()]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._rounds = deque((r["sent"], done({int(p): t for p, t in r["received"].items()}))
                             for r in sd.get("rounds", []))


def make_stale_rounds(agent: int, staleness: int, step: Optional[float], weights: np.ndarray,
                      initial: Callable[[int], Tensor]) -> Optional[StaleRounds]:
    """Agent ``agent``'s delay line for ``strategy.staleness`` (None for 0: the synchronous exchange)."""
    return StaleRounds(agent, staleness, stale_step(weights, staleness, step), initial) if staleness else None
