"""The Combine step between the agent and the transport: what each agent sends its neighbours in a round, and
how it merges what it receives — the same objects in a torchrun process and in both simulator engines.

A round is two calls on one agent's :class:`Gossip`: ``outgoing(phi, plan, r)`` gives the message for each peer
of round ``r`` (``plan``: this agent's column of the round's weights), and ``merge(phi, received, plan, r)`` the
combined state. Between them the transport (torchrun) or :func:`gossip_round` (the simulator) delivers the
messages. Which rounds exist (``strategy.combine_every``) and which graph each uses (``schedules.py``) are
decided around it.

Two schemes:

- :class:`FullStateGossip` (``compression=none``): send ``phi``, combine ``w_k = sum_l a_lk phi_l`` — Dif-MAML
  exactly as in the paper, bit for bit the combine of ``combine.py``.
- :class:`ChocoGossip` (any compressor): CHOCO-gossip (Koloskova, Stich & Jaggi 2019) on the Adapt step's
  output, the compressed diffusion of ACTC (Carpentiero, Matta & Sayed 2022) with a self-referenced correction.
  Each directed edge ``k -> l`` has a reference copy ``h_kl`` of ``phi_k`` that both ends hold and update
  identically. In a round, k sends ``q_kl = C(phi_k - h_kl)``; both ends set ``h_kl += zeta * q_kl``; then

      w_k = phi_k + gamma * sum_l a_lk (h_lk - h_kl).

  Each edge's two terms cancel in the network sum when the weights are symmetric (Metropolis), so the combine
  keeps the network average of phi. The copies carry what compression dropped into later rounds (error
  compensation). Copies start at the sender's initial model, which every agent can compute from the seed.
  Per-edge copies (rather than one per sender) keep both ends in agreement when the graph changes between rounds.
  Without compression (C = identity, zeta = gamma = 1) it reduces to the full-state combine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist import seeding
from dif_maml_dist.comm.transport import done, nbytes
from dif_maml_dist.config import CompressionConfig, Config
from dif_maml_dist.gossip.combine import combine
from dif_maml_dist.gossip.compression import Compressor, make_compressor
from dif_maml_dist.gossip.stale import StaleRounds
from dif_maml_dist.graphs.schedules import GraphSchedule
from dif_maml_dist.graphs.weights import CombinePlan


class Gossip(ABC):
    """One agent's side of a combination round (see the module doc)."""

    @abstractmethod
    def outgoing(self, phi: Tensor, plan: CombinePlan, r: int) -> dict[int, Tensor]: ...

    @abstractmethod
    def merge(self, phi: Tensor, received: Mapping[int, Tensor], plan: CombinePlan, r: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


class FullStateGossip(Gossip):
    """Send the full state; ``w_k = sum_l a_lk phi_l``."""

    def outgoing(self, phi: Tensor, plan: CombinePlan, r: int) -> dict[int, Tensor]:
        return {p: phi for p in plan.neighbors}

    def merge(self, phi: Tensor, received: Mapping[int, Tensor], plan: CombinePlan, r: int) -> Tensor:
        return combine(plan, phi, received)


class ChocoGossip(Gossip):
    """Compressed differences to per-edge reference copies, then a consensus step ``gamma`` (module doc).

    ``initial(l)``: agent l's initial model (where the copies of l's state start)."""

    def __init__(self, agent: int, compressor: Compressor, gamma: float, zeta: float, seed: int,
                 initial: Callable[[int], Tensor]):
        self.agent, self.compressor, self.gamma, self.zeta, self.seed = agent, compressor, gamma, zeta, seed
        self.initial = initial
        self.sent: dict[int, Tensor] = {}  #: h_{agent -> l}: peer l's copy of this agent's state
        self.held: dict[int, Tensor] = {}  #: h_{l -> agent}: this agent's copy of peer l's state
        self._own: dict[int, Tensor] = {}  #: this round's decoded messages to each peer

    def _gen(self, sender: int, r: int) -> Optional[torch.Generator]:
        # Each peer's message draws the same numbers (randk: the same indices): the seed is the sender's and the
        # round's, so the receiver can draw them too and nothing about them is sent.
        return seeding.generator(self.seed, seeding.Stream.COMPRESSION, sender, r) if self.compressor.random else None

    def _decode(self, payload: Tensor, like: Tensor, sender: int, r: int) -> Tensor:
        return self.compressor.decode(payload, like.numel(), like.dtype, self._gen(sender, r)).to(like.device)

    def _copies(self, phi: Tensor, peer: int) -> None:
        if peer not in self.sent:  # first round with this peer: both ends start from the initial models
            self.sent[peer] = self.initial(self.agent).to(phi.device, phi.dtype).clone()
            self.held[peer] = self.initial(peer).to(phi.device, phi.dtype).clone()

    def outgoing(self, phi: Tensor, plan: CombinePlan, r: int) -> dict[int, Tensor]:
        out, self._own = {}, {}
        phi = phi.detach()
        for p in plan.neighbors:
            self._copies(phi, p)
            payload = self.compressor.encode(phi - self.sent[p], self._gen(self.agent, r))
            self._own[p] = self._decode(payload, phi, self.agent, r)
            out[p] = payload
        return out

    def merge(self, phi: Tensor, received: Mapping[int, Tensor], plan: CombinePlan, r: int) -> Tensor:
        assert set(received) == set(plan.neighbors) == set(self._own), "merge must follow this round's outgoing"
        w = phi.detach().clone()
        for p, a in zip(plan.neighbors, plan.neighbor_weights):  # ascending peer id: a fixed order
            self.sent[p].add_(self._own[p], alpha=self.zeta)
            self.held[p].add_(self._decode(received[p], phi, p, r), alpha=self.zeta)
            w.add_(self.held[p] - self.sent[p], alpha=self.gamma * a)
        self._own = {}
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"sent": {p: t.clone() for p, t in self.sent.items()},
                "held": {p: t.clone() for p, t in self.held.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sent = {int(p): t.clone() for p, t in sd["sent"].items()}
        self.held = {int(p): t.clone() for p, t in sd["held"].items()}


def consensus_steps(c: CompressionConfig) -> tuple[float, float]:
    """``(gamma, zeta)`` for a compressor: the configured values, or defaults found stable on the sinusoid
    (docs/notes.md, "Consensus steps of compressed gossip"). The consensus step must shrink with the fraction of
    the state a message carries; the copies' step with the compressor's variance."""
    auto_gamma = {"topk": min(1.0, 2.5 * c.ratio), "randk": min(1.0, c.ratio)}.get(c.name, 0.5)
    auto_zeta = {2: 0.3, 3: 0.5}.get(c.bits, 1.0) if c.name == "qsgd" else 1.0
    return (auto_gamma if c.gamma is None else c.gamma), (auto_zeta if c.zeta is None else c.zeta)


def make_gossip(cfg: Config, agent: int, initial: Callable[[int], Tensor]) -> Gossip:
    """Agent ``agent``'s gossip for ``cfg.compression``."""
    compressor = make_compressor(cfg.compression)
    if compressor is None:
        return FullStateGossip()
    gamma, zeta = consensus_steps(cfg.compression)
    return ChocoGossip(agent, compressor, gamma, zeta, cfg.seed, initial)


def gossip_round(gossips: Sequence[Gossip], phis: Sequence[Tensor], schedule: GraphSchedule, r: int,
                 stale: Optional[Sequence[StaleRounds]] = None) -> tuple[list[Tensor], list[int]]:
    """Round ``r`` for all agents of one process (the simulator): the combined states and the bytes each agent
    sent. The messages are handed over as they are (a transport would copy their bytes unchanged). ``stale``:
    each agent's delay line (``strategy.staleness``), which combines instead of the gossip; the ``phis`` then must
    not change afterwards (they wait in the lines)."""
    plans = [schedule.plan(r, k) for k in range(len(gossips))]
    outs = [g.outgoing(phi, plan, r) for g, phi, plan in zip(gossips, phis, plans)]
    received = [{l: outs[l][k] for l in plan.neighbors} for k, plan in enumerate(plans)]
    if stale is not None:
        combined = [line.combine(phi, done(messages), plan, phi).wait()
                    for line, messages, plan, phi in zip(stale, received, plans, phis)]
    else:
        combined = [g.merge(phi, messages, plan, r) for g, phi, messages, plan in zip(gossips, phis, received, plans)]
    return combined, [sum(nbytes(m) for m in out.values()) for out in outs]
