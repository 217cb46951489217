"""Who is behind when a round does not complete: progress on a side channel, and waiting that names the laggard.

A backend tells an agent only that *its* message did not arrive, and nccl not even that: its ``work.wait()``
orders CUDA streams and returns at once, so a hung peer surfaces much later as a stall or a watchdog abort. So
every agent publishes how many training rounds it has entered on a side channel (the rendezvous store), and
:class:`RoundWaiter` waits on each round's work objects the way the backend allows — blocking with a timeout on
gloo, polling ``is_completed()`` against a deadline on nccl — and, when the deadline passes, reads the side
channel to name the neighbour(s) that stopped advancing (or, if the neighbours wait themselves, the agents
further away that are behind).

Rounds are counted by each agent's transport (exchanges and all-reduces entered since the process group formed),
so every agent counts the same rounds, also after a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from dif_maml_dist.messages import first_line


class PeerError(RuntimeError):
    """A peer did not deliver its message: it died, hung, or did not answer within the timeout."""

    def __init__(self, message: str, peer: int | None = None):
        super().__init__(message)
        self.peer = peer  #: the agent that did not answer (None where no single agent can be named)


class ProgressBoard(Protocol):
    """Each agent's count of training rounds entered, readable by every agent."""

    def advance(self, round: int) -> None:
        """This agent has entered ``round`` (cheap: called every round; publishing happens at a low rate)."""

    def positions(self) -> dict[int, int]:
        """The last published round of every agent that has published one (empty when the channel is gone)."""


class StoreProgressBoard:
    """Progress in a torch.distributed key-value store (torchrun's rendezvous store), one key per agent.

    A daemon thread writes this agent's round at most every ``interval_s`` seconds, and only when it changed, so
    the store sees a few writes per second from the whole job whatever the iteration rate; it keeps writing
    while the main thread blocks in a wait (which releases the GIL). The key is written once at construction,
    before the first barrier, so every agent's key exists when anyone reads it.
    """

    def __init__(self, store: Any, rank: int, world_size: int, interval_s: float = 1.0, heartbeat: bool = False):
        """``heartbeat``: also write at every interval when the round has not changed, with a beat count, so
        that readers can tell a process that waits (it beats) from one that is stopped or gone (it does not);
        see :class:`PeerWatch`."""
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.heartbeat = heartbeat
        self._round = 0
        self._beat = 0
        self._published: Optional[int] = None
        self._publish()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dif_maml_dist-progress-{rank}", daemon=True)
        self._thread.start()

    def advance(self, round: int) -> None:
        self._round = round  # one int: the heartbeat thread reads whichever value is current

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.heartbeat or self._round != self._published:
                self._publish()

    def _publish(self) -> None:
        r = self._round
        self._beat += 1
        try:
            self.store.set(str(self.rank), f"{r} {self._beat}" if self.heartbeat else str(r))
            self._published = r
        except Exception:  # the store is gone (its host died): a report at a timeout says the channel is silent
            pass

    def heartbeats(self) -> dict[int, tuple[int, int]]:
        """``(round, beat)`` of every agent (beat 0 where it publishes no heartbeat); empty when the channel is
        gone."""
        keys = [str(k) for k in range(self.world_size)]
        try:
            values = self.store.multi_get(keys)
        except Exception:
            return {}
        out = {}
        for k, v in zip(range(self.world_size), values):
            parts = v.decode().split() if isinstance(v, bytes) else str(v).split()
            out[k] = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
        return out

    def positions(self) -> dict[int, int]:
        return {k: r for k, (r, _) in self.heartbeats().items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1.0)


class PeerWatch:
    """When to stop waiting for a neighbour's message, from the heartbeat board (continue mode).

    A plain timeout cannot tell a neighbour that is hung from one that waits for a hung agent further on: the
    waits of a whole chain expire together and the network falls apart. So an agent keeps waiting past
    ``timeout_s`` for a neighbour that still beats and whose round moved within ``2 x timeout_s`` (it is waiting
    for someone itself, and its own wait ends within ``timeout_s``), and gives up on one that has not beaten for
    ``timeout_s`` (stopped, dead, or cut off) or whose round has not moved for ``2 x timeout_s`` while it beats
    (alive but stuck). Without a board (or with a silent one) the plain timeout decides."""

    def __init__(self, board: Optional[Any], timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.board, self.timeout_s, self.clock = board, timeout_s, clock
        self._seen: dict[int, tuple[tuple[int, int], float, float]] = {}  #: peer -> (round, beat), beat at, moved at

    def observe(self) -> None:
        beats = self.board.heartbeats() if self.board is not None and hasattr(self.board, "heartbeats") else {}
        now = self.clock()
        for p, (round, beat) in beats.items():
            old = self._seen.get(p)
            if old is None:
                self._seen[p] = ((round, beat), now, now)
            else:
                (old_round, old_beat), beat_at, moved_at = old
                self._seen[p] = ((round, beat), now if beat != old_beat else beat_at,
                                 now if round != old_round else moved_at)

    def verdict(self, peer: int, waited_s: float) -> Optional[str]:
        """Why to give up on ``peer`` after waiting ``waited_s`` for its message, or None to keep waiting."""
        if waited_s < self.timeout_s:
            return None
        seen = self._seen.get(peer)
        if seen is None:
            return f"no message within {self.timeout_s:g} s (and no heartbeat to tell whether it lives)"
        now = self.clock()
        (round, _), beat_at, moved_at = seen
        if now - beat_at >= self.timeout_s:
            return f"no message and no heartbeat for {now - beat_at:.0f} s (stopped, dead or cut off; at round {round})"
        if now - moved_at >= 2 * self.timeout_s:
            return f"alive but stuck at round {round} for {now - moved_at:.0f} s"
        return None


def stall_report(rank: int, round: int, peers: Sequence[int], positions: Mapping[int, int]) -> tuple[list[int], str]:
    """Whom to blame for round ``round`` of agent ``rank`` not completing with ``peers``, and why, from the
    side channel's ``positions``: the peers that have not reached the round; if every peer has (they wait
    themselves), the agents furthest behind in the whole network. Pure."""
    peers = sorted(set(peers))
    if not positions:
        return peers, "the progress channel is silent (the rendezvous host may be gone)"
    behind = [p for p in peers if positions.get(p, -1) < round]
    if behind:
        where = ", ".join(f"agent {p} at round {positions[p]}" if p in positions else f"agent {p} never reported"
                          for p in behind)
        return behind, f"stopped advancing: {where}; this agent is at round {round}"
    lowest = min(positions.values())
    if lowest < round:
        laggards = sorted(k for k, v in positions.items() if v == lowest)
        return peers, (f"its neighbours reached round {round} too and wait themselves; behind them: "
                       f"{_agents(laggards)} at round {lowest}")
    return peers, f"every agent has entered round {round}: a message was lost or the network is stuck"


def _agents(ids: Sequence[int]) -> str:
    return f"agent {ids[0]}" if len(ids) == 1 else f"agents {', '.join(map(str, ids))}"


def _blame(peers: Sequence[int]) -> tuple[str, Optional[int]]:
    """``no message from ...`` wording and PeerError.peer for the agents blamed."""
    peers = sorted(set(peers))
    if len(peers) == 1:
        return f"agent {peers[0]}", peers[0]
    return f"one of agents {', '.join(map(str, peers))}", None


@dataclass
class _Posted:
    round: int
    works: Sequence[Any]
    op_peers: Sequence[int]
    at: float
    keep: Any  #: the round's tensors, alive until its works complete


class RoundWaiter:
    """Waits on every work object a round's ``batch_isend_irecv`` (or all-reduce) returned, within ``timeout_s``.

    ``blocking`` (gloo): ``work.wait(timeout)`` blocks until the message is there or raises; gloo returns one work
    per operation, so a failure names that operation's peer. Otherwise (nccl: one work for the whole batch, and
    ``wait()`` only makes the current stream wait): rounds stay *in flight* — the host may run ``in_flight``
    rounds ahead of the network, so there is no host synchronisation per iteration — and a round is settled by
    polling ``is_completed()`` until its deadline, ``timeout_s`` after it was posted. On a timeout the progress
    board names who is behind.
    """

    def __init__(self, rank: int, timeout_s: float, board: Optional[ProgressBoard], blocking: bool,
                 in_flight: int = 1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rank, self.timeout_s, self.board, self.blocking = rank, timeout_s, board, blocking
        self.in_flight, self.clock, self.sleep = in_flight, clock, sleep
        self.round = 0  #: training rounds entered by this agent: the current combination round + 1
        self._pending: deque[_Posted] = deque()

    def enter(self, round: int) -> int:
        """Combination round ``round`` (0-based, as its owner ``gossip.rounds.combine_round`` numbers it) starts:
        publish it as rounds entered (before its messages are posted)."""
        self.round = round + 1
        if self.board is not None:
            self.board.advance(self.round)
        return self.round

    def post(self, works: Sequence[Any], op_peers: Sequence[int], keep: Any = None) -> None:
        """Wait on the current round's works as the backend allows (see the class)."""
        if self.blocking:
            self._wait_blocking(works, op_peers)
            return
        for w in works:
            w.wait()  # nccl: the current stream waits for the transfer; the host does not
        self._pending.append(_Posted(self.round, works, op_peers, self.clock(), keep))
        while len(self._pending) > self.in_flight:
            self._settle(self._pending.popleft())

    def drain(self) -> None:
        """Settle every round in flight (before collectives off the training path, and at the end)."""
        while self._pending:
            self._settle(self._pending.popleft())

    def _wait_blocking(self, works: Sequence[Any], op_peers: Sequence[int]) -> None:
        # One work per operation: name that operation's peer. Fewer works than operations (one per batch): only
        # the round's peers as a whole can be blamed.
        blamed = [[p] for p in op_peers] if len(works) == len(op_peers) else [list(op_peers)] * len(works)
        timeout = timedelta(seconds=self.timeout_s)
        for work, peers in zip(works, blamed):
            try:
                work.wait(timeout)
            except RuntimeError as err:
                self._fail(peers, first_line(err))

    def _settle(self, posted: _Posted) -> None:
        deadline = posted.at + self.timeout_s
        delay = 1e-5
        while True:
            try:
                if all(w.is_completed() for w in posted.works):
                    return
            except RuntimeError as err:  # the backend itself failed the work (nccl's watchdog, an aborted comm)
                self._fail(posted.op_peers, first_line(err), posted.round)
            if self.clock() >= deadline:
                self._fail(posted.op_peers, f"round {posted.round} not complete after {self.timeout_s:g} s",
                           posted.round)
            self.sleep(delay)
            delay = min(2 * delay, 0.01)  # microseconds while a transfer finishes, ≤ 10 ms once it lags

    def _fail(self, peers: Sequence[int], cause: str, round: Optional[int] = None) -> None:
        round = self.round if round is None else round
        detail = ""
        if self.board is not None:  # the report narrows the blame to a subset of ``peers``
            peers, why = stall_report(self.rank, round, peers, self.board.positions())
            detail = f"; {why}"
        who, peer = _blame(peers)
        raise PeerError(f"no message from {who} ({cause}){detail}", peer=peer) from None
