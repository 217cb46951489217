"""A transport that survives its peers: one two-rank gloo process group per graph edge
(``runtime.on_peer_failure=continue``).

Why per edge. A default process group spans every agent, and no process can join it once it has formed; its
collectives need everyone. Here each edge ``(u, v)`` gets its own ``ProcessGroupGloo`` of two ranks, rendezvoused
through the job's store under ``edges/<u>-<v>/<tag>``, so an agent's exchanges depend on its live neighbours only:
a dead neighbour's group fails on its own (a closed socket at once; a stopped one is given up once its heartbeat
has been silent for ``timeout_s``, ``liveness.PeerWatch``) while the other edges go on, and a new process can
form a new group with a neighbour under a new tag. No collective over all agents exists on this transport.

Cost: one gloo context (a socket pair and its threads) per edge end, i.e. ``degree`` per agent instead of one
full mesh of ``K - 1`` pairs; start-up forms the edges one after the other in the global edge order (ascending
``(u, v)``), which cannot deadlock since every agent waits for its edges in that same order.

Size: the exchange, the forming of edges and the welcome handshake share one per-edge state (groups, threads
forming, answered joins) and must change together.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from dif_maml_dist.comm.liveness import PeerWatch, ProgressBoard
from dif_maml_dist.comm.transport import nbytes
from dif_maml_dist.messages import first_line

_PAYLOAD_TAG, _HEADER_TAG = 0, 1
#: What a store raises once its host is gone: torch's TCPStore raises ``DistNetworkError`` / ``DistStoreError``
#: (both RuntimeErrors), the socket underneath an ``OSError`` (``ConnectionError``, ``TimeoutError``). Anything else
#: (a TypeError, a malformed value) is a bug and propagates.
_STORE_GONE = (RuntimeError, OSError)


class _Done:
    """One round's operations on one edge, waited for by the edge's waiter thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: Optional[str] = None


class _EdgeWaiter:
    """A thread that waits on an edge's operations, so that the agent can stop waiting whenever it decides.

    gloo cannot be waited on a little at a time: a ``wait(timeout)`` that expires closes the connection, and
    its works complete only inside ``wait``. So the blocking wait (with the group's own long timeout) happens
    here, and the agent watches an event, deciding from the heartbeats when to give up (``PeerWatch``)."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, works: list, keep: Any) -> _Done:
        done = _Done()
        self._queue.put((works, keep, done))
        return done

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            works, _keep, done = item  # _keep: the round's tensors stay alive until its works are done
            try:
                for w in works:
                    w.wait()
            except Exception as err:
                done.error = _reason(err)
            done.event.set()
            if done.error is not None:
                return  # the edge is broken: the agent drops it


def _reason(err: BaseException) -> str:
    # gloo appends advice (and an emoji) to its socket errors: the first sentence is the fact.
    return first_line(err).split(" This is typically", 1)[0]


def edge_key(a: int, b: int, tag: str) -> str:
    lo, hi = sorted((a, b))
    return f"edges/{lo}-{hi}/{tag}"


class TolerantTransport(Protocol):
    """What a combiner that survives its neighbours (``gossip.tolerant``) needs from the wire: exchanges that
    report failed peers instead of raising, and the handshakes of an agent coming back. It has no collective over
    all agents: nothing in continue mode may need every agent. :class:`EdgeTransport` implements it."""

    rank: int
    peers: list[int]  #: the base graph's neighbours
    groups: dict[int, Any]  #: the neighbours this agent has a working edge to
    timeout_s: float
    incarnation: int  #: how many times this agent has started before (0: the first start)
    bytes_sent: int  #: training payload (headers included) handed to the network so far
    current_round: Optional[int]  #: the combination round this agent is in (``enter``)
    form_errors: dict[int, str]  #: peer -> why forming its edge failed (the latest failure)

    def enter(self, round: int) -> None:
        """Combination round ``round`` starts (before its joins are answered and its messages posted)."""

    def exchange_tolerant(self, messages: Mapping[int, Tensor], header: Tensor
                          ) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, str]]:
        """Each peer's message and header, and the peers that failed (peer -> why), dropped."""

    def drop(self, peer: int) -> None: ...

    def report_departed(self, peer: int, incarnation: int) -> None: ...

    def poll_joins(self, disconnected: Iterable[int]) -> Optional[int]: ...

    def formed(self) -> list[tuple[int, dict]]: ...

    @property
    def forming(self) -> bool: ...

    def rejoin(self, header_like: Tensor, params_like: Tensor) -> None: ...

    def counters(self) -> dict[str, int]: ...

    def restore_counters(self, saved: dict[str, Any]) -> None: ...

    def welcome(self, peer: int, header: Tensor, params: Tensor) -> int: ...


class EdgeTransport:
    """Agent ``rank``'s side of one gloo group per neighbour in ``peers`` (see the module doc): a
    :class:`TolerantTransport`."""

    def __init__(self, store: Any, rank: int, world_size: int, peers: Iterable[int], timeout_s: float,
                 connect_timeout_s: float, board: ProgressBoard | None = None,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 1.0,
                 connect_store: Optional[Callable[[], Any]] = None):
        """Agent ``rank``'s edges to ``peers``, all formed here at the first start; at a restart (the store counts
        this agent's starts: ``incarnation``) none until :meth:`rejoin`. ``connect_store``: a new connection to
        the same store, for each edge formed in a thread (default: ``store`` itself)."""
        self.bytes_sent = 0  #: training payload handed to the network by this agent so far
        self.store, self.rank, self.world_size = store, rank, world_size
        # One store client serves one blocking wait at a time: an edge forming in a thread waits in the store for
        # its neighbour, and would hold up everything else this process asks the store meanwhile (the other
        # edges forming, the join polls of the training loop). Each thread gets its own connection.
        self.connect_store = connect_store or (lambda: store)
        self.timeout_s, self.board, self.clock, self.poll_s = timeout_s, board, clock, poll_s
        self.connect_timeout_s = connect_timeout_s
        self.peers = sorted(peers)  #: the base graph's neighbours
        #: the combination round this agent is in, as its combiner announced it (``enter``) or, for an agent that
        #: came back, as its first welcome set it; None before either
        self.current_round: Optional[int] = None
        self.groups: dict[int, Any] = {}
        self._abandoned: list[Any] = []  # failed groups: kept alive, their gloo threads may still hold a pending op
        self._forming: dict[int, tuple[threading.Thread, dict]] = {}
        #: peer -> why forming an edge with it failed, the latest failure (kept by :meth:`formed`)
        self.form_errors: dict[int, str] = {}
        self._answered: dict[int, int] = {}  #: peer -> the join sequence number this agent answered
        self._last_poll = float("-inf")
        self._waiters: dict[int, _EdgeWaiter] = {}
        self.watch = PeerWatch(board, timeout_s, clock)
        #: how long a round waits before it looks at the heartbeats (they only matter past timeout_s)
        self.watch_from_s = min(1.0, timeout_s / 4)
        self._adopt = threading.Lock()
        self._adopted = False  #: a restarted agent has taken its first welcome
        #: how many times this agent has started before (0: the first start); kept by the store across restarts
        self.incarnation = int(store.add(f"starts/{rank}", 1)) - 1
        #: position of this start among the job's restarts (0: a first start). An edge between two agents that
        #: both came back is formed by the later one's request and answered by the earlier one
        self.join_seq = 0 if self.incarnation == 0 else int(store.add("join_seq", 1))
        if self.incarnation == 0:
            for p in self.peers:  # the global edge order (module doc)
                self.groups[p] = self._connect(p, "start", connect_timeout_s)

    @property
    def joining(self) -> bool:
        return self.incarnation > 0

    def _connect(self, peer: int, tag: str, timeout_s: float, store: Any = None) -> Any:
        store = dist.PrefixStore(edge_key(self.rank, peer, tag), store if store is not None else self.store)
        return dist.ProcessGroupGloo(store, 0 if self.rank < peer else 1, 2, timedelta(seconds=timeout_s))

    def _other(self, peer: int) -> int:
        return 1 if self.rank < peer else 0

    def drop(self, peer: int) -> None:
        """Stop talking to ``peer`` (its group is abandoned, not destroyed; its waiter may still be blocked in
        the last operation, until that fails or completes)."""
        group = self.groups.pop(peer, None)
        if group is not None:
            self._abandoned.append(group)
        waiter = self._waiters.pop(peer, None)
        if waiter is not None:
            waiter.close()

    # -- coming back -------------------------------------------------------------------------------------
    # A restarted agent publishes ``join/<rank>`` and constructs an edge group with each neighbour, in threads;
    # a live neighbour that reads the request (``poll_joins``) constructs its end in a thread too. Once formed, the
    # live end sends a *welcome* (its round, membership vector and parameters) and waits for the reply: the
    # round ``R`` from which both exchange on the edge. The returning end answers from its thread at once, so
    # the live end never waits for the other's training loop (that could wait for the live end in turn):
    # ``R`` is the welcome's round + 1 for its first welcome (it takes that round as its own) and otherwise at
    # least two rounds past its own, which its loop has not reached, since it looks for formed edges every round.

    @staticmethod
    def _join_tag(agent: int, seq: int) -> str:
        return f"join{seq}-agent{agent}"

    def rejoin(self, header_like: Tensor, params_like: Tensor) -> None:
        """A restarted agent asks its neighbours to take it back (messages shaped like the arguments)."""
        assert self.joining
        self.store.set(f"join/{self.rank}", f"{self.join_seq} {self.incarnation}")
        for p in self.peers:
            self._form(p, self._join_tag(self.rank, self.join_seq), returning=(header_like, params_like))

    def _form(self, peer: int, tag: str, returning: Optional[tuple[Tensor, Tensor]] = None,
              incarnation: Optional[int] = None) -> None:
        box: dict = {"incarnation": incarnation}

        def connect() -> None:
            try:
                group = self._connect(peer, tag, self.connect_timeout_s, self.connect_store())
                if returning is not None:
                    box.update(self._answer_welcome(group, peer, *returning))
                box["group"] = group
            except Exception as err:  # the neighbour never came (dead too, or finished): no edge
                box["error"] = _reason(err)
        thread = threading.Thread(target=connect, name=f"dif_maml_dist-edge-{self.rank}-{peer}", daemon=True)
        thread.start()
        self._forming[peer] = (thread, box)

    def _answer_welcome(self, group: Any, peer: int, header_like: Tensor, params_like: Tensor) -> dict:
        other, wait = self._other(peer), timedelta(seconds=self.connect_timeout_s)
        header, params = torch.empty_like(header_like), torch.empty_like(params_like, device="cpu")
        group.recv([header], other, _HEADER_TAG).wait(wait)
        group.recv([params], other, _PAYLOAD_TAG).wait(wait)
        theirs = int(header[0])
        with self._adopt:
            first = not self._adopted
            self._adopted = True
            start = theirs + 1 if first else max(theirs + 1, (self.current_round or 0) + 2)
            if first:
                # The round this agent re-enters at is its round from now on: a later welcome (a slower neighbour)
                # arriving before its first combine must start past it, not past None
                self.current_round = start
        group.send([torch.tensor([start], dtype=torch.int64)], other, _HEADER_TAG).wait(wait)
        return {"start": start, "header": header, "params": params if first else None}

    def report_departed(self, peer: int, incarnation: int) -> None:
        """Record in the store that this agent dropped ``peer`` (so that the peer, if it was only stopped, learns
        it when it resumes: :meth:`poll_joins`)."""
        try:
            self.store.set(f"departed/{peer}/{incarnation}", str(self.rank))
        except _STORE_GONE:  # the store is gone: the peer learns it from the messages that no longer come
            pass

    def poll_joins(self, disconnected: Iterable[int]) -> Optional[int]:
        """Answer the requests of neighbours in ``disconnected`` that came back (at most every ``poll_s``).
        Returns the agent that dropped this one, if one did (it was stopped or cut off for too long)."""
        now = self.clock()
        if now - self._last_poll < self.poll_s:
            return None
        self._last_poll = now
        try:
            mine = f"departed/{self.rank}/{self.incarnation}"
            if self.store.check([mine]):
                return int(self.store.get(mine))
            for p in disconnected:
                if p in self.groups or p in self._forming or not self.store.check([f"join/{p}"]):
                    continue
                seq, inc = (int(x) for x in self.store.get(f"join/{p}").decode().split())
                if seq > self.join_seq and self._answered.get(p) != seq:
                    self._answered[p] = seq
                    self._form(p, self._join_tag(p, seq), incarnation=inc)
        except _STORE_GONE:  # the store's host is gone: the edges that exist go on, nobody can come back
            pass
        return None

    def formed(self) -> list[tuple[int, dict]]:
        """Edges formed since the last call (now in ``groups``), with what forming them found: ``incarnation``
        (this agent welcomes the peer back: call :meth:`welcome`) or ``start``, ``header``, ``params`` (this
        agent came back and the peer welcomed it). An edge that failed to form is not returned; why it failed is
        kept in :attr:`form_errors`."""
        done = []
        for p, (thread, box) in list(self._forming.items()):
            if thread.is_alive():
                continue
            del self._forming[p]
            if "group" in box:
                self.groups[p] = box.pop("group")
                self.form_errors.pop(p, None)
                done.append((p, box))
            else:
                self.form_errors[p] = box.get("error", "forming the edge failed")
        return done

    @property
    def forming(self) -> bool:
        """Some edge is still being formed."""
        return bool(self._forming)

    def welcome(self, peer: int, header: Tensor, params: Tensor) -> int:
        """Send a returning ``peer`` this agent's round, view and ``params``; the round from which both exchange."""
        group, other, wait = self.groups[peer], self._other(peer), timedelta(seconds=self.timeout_s)
        group.send([header.detach().cpu().contiguous()], other, _HEADER_TAG).wait(wait)
        group.send([params.detach().cpu().contiguous()], other, _PAYLOAD_TAG).wait(wait)
        start = torch.zeros(1, dtype=torch.int64)
        group.recv([start], other, _HEADER_TAG).wait(wait)
        return int(start[0])

    def counters(self) -> dict[str, int]:
        """What this transport has counted, for a checkpoint (restored by :meth:`restore_counters`)."""
        return {"bytes_sent": self.bytes_sent}

    def restore_counters(self, saved: dict[str, Any]) -> None:
        self.bytes_sent = int(saved["bytes_sent"])

    def enter(self, round: int) -> None:
        """Combination round ``round`` (its owner: ``gossip.rounds.combine_round``) starts: remembered for the
        welcome handshake and published as rounds entered, as the default transport does."""
        self.current_round = round
        if self.board is not None:
            self.board.advance(round + 1)

    def exchange_tolerant(self, messages: Mapping[int, Tensor], header: Tensor
                          ) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, str]]:
        """Send each peer its message and ``header``, receive theirs; a peer whose edge fails (a closed socket)
        or that the :class:`~dif_maml_dist.comm.liveness.PeerWatch` gives up on is reported in the third dict
        (peer -> why) and dropped, not raised."""
        header = header.detach().cpu().contiguous()
        posted, failed = {}, {}
        for p, message in messages.items():
            group = self.groups.get(p)
            if group is None:
                failed[p] = "no connection to it"
                continue
            payload = message.detach().cpu().contiguous()
            bufs = (torch.empty_like(header), torch.empty_like(payload))
            other = self._other(p)
            # Counted when handed over, before posting: a peer that has just gone may or may not have closed its
            # socket yet (posting fails at once, or later), and the count must not depend on which (the
            # simulator counts every message an agent hands to a peer it believes present).
            self.bytes_sent += nbytes(header) + nbytes(payload)
            try:
                # All of a round's operations are posted before any wait, so no agent blocks on a send while
                # its peer blocks on another: the order of posting cannot deadlock.
                works = [group.send([header], other, _HEADER_TAG), group.send([payload], other, _PAYLOAD_TAG),
                         group.recv([bufs[0]], other, _HEADER_TAG), group.recv([bufs[1]], other, _PAYLOAD_TAG)]
            except RuntimeError as err:
                failed[p] = _reason(err)
                continue
            posted[p] = (self._waiter(p).submit(works, (header, payload, bufs)), bufs)
        received, headers = {}, {}
        start, checked = self.clock(), float("-inf")
        pending = dict(posted)
        while pending:
            for p, (done, bufs) in list(pending.items()):
                if done.event.is_set():
                    del pending[p]
                    if done.error is not None:
                        failed[p] = done.error
                    else:
                        headers[p], received[p] = bufs[0], bufs[1].to(messages[p].device)
            if not pending:
                break
            waited = self.clock() - start
            if waited >= self.watch_from_s and self.clock() - checked >= self.poll_s / 5:
                checked = self.clock()
                self.watch.observe()
                for p in list(pending):
                    why = self.watch.verdict(p, waited)
                    if why is not None:
                        failed[p] = why
                        del pending[p]
            if pending:
                next(iter(pending.values()))[0].event.wait(0.05 if waited >= self.watch_from_s else 0.01)
        for p in failed:
            self.drop(p)
        return received, headers, failed

    def _waiter(self, peer: int) -> "_EdgeWaiter":
        if peer not in self._waiters:
            self._waiters[peer] = _EdgeWaiter(f"dif_maml_dist-wait-{self.rank}-{peer}")
        return self._waiters[peer]
