"""How agents talk: a small interface with an in-memory and a torch.distributed implementation.

The agent loop depends only on :class:`Transport`. Training traffic is ``exchange`` (neighbours, Dif-MAML)
and ``all_reduce_mean`` (the centralized baseline); both count the bytes this agent sends. Each has a ``post_``
form that returns as soon as the messages are handed to the network, with a :class:`Pending` to wait on later
(``strategy.overlap``: the exchange runs while the agent computes). ``all_gather_object`` and ``barrier`` are
for diagnostics and bookkeeping at evaluation steps and are not counted.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Generic, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dif_maml_dist.comm.liveness import PeerError, ProgressBoard, RoundWaiter
from dif_maml_dist.messages import first_line


def nbytes(t: Tensor) -> int:
    """Bytes a tensor occupies on the wire."""
    return t.numel() * t.element_size()


def ring_all_reduce_bytes(world_size: int, message_bytes: int) -> int:
    """What each agent sends in a ring all-reduce of one message: 2 (K-1)/K of it (how all-reduces are charged)."""
    return 2 * (world_size - 1) * message_bytes // world_size


T = TypeVar("T")


class Pending(Generic[T]):
    """A posted round: ``wait()`` blocks until it is complete (within the transport's timeout) and gives its
    result; call it exactly once."""

    def __init__(self, wait: Callable[[], T]):
        self._wait: Optional[Callable[[], T]] = wait

    def wait(self) -> T:
        assert self._wait is not None, "a pending round is waited on once"
        wait, self._wait = self._wait, None
        return wait()


def done(value: T) -> Pending[T]:
    """A round that is already complete."""
    return Pending(lambda: value)


class Transport(ABC):
    """Point-to-point exchange and a few collectives among ``world_size`` agents; this one is ``rank``."""

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.bytes_sent = 0  #: training payload handed to the network by this agent so far

    def exchange(self, messages: Mapping[int, Tensor], round: int) -> dict[int, Tensor]:
        """Send ``messages[p]`` to each peer ``p`` and receive one message from each, of the same shape and dtype
        as the one sent to it (both ends of an edge send the same kind of payload), in combination round
        ``round`` (``gossip.rounds.combine_round``: its one owner; the transport only reports it).

        Every peer must call ``exchange`` with a message for this agent in the same round (the round's graph is
        undirected), otherwise the call waits until the timeout. The bytes of the messages are counted.
        """
        return self.post_exchange(messages, round).wait()

    @abstractmethod
    def post_exchange(self, messages: Mapping[int, Tensor], round: int) -> Pending[dict[int, Tensor]]:
        """:meth:`exchange`, returning once the messages are posted. The messages must stay unchanged until the
        round has been waited on (they may still be on their way)."""

    def all_reduce_mean(self, tensor: Tensor, round: int) -> Tensor:
        """Mean of ``tensor`` over all agents in combination round ``round`` (a new tensor; the input is left
        unchanged)."""
        return self.post_all_reduce_mean(tensor, round).wait()

    @abstractmethod
    def post_all_reduce_mean(self, tensor: Tensor, round: int) -> Pending[Tensor]:
        """:meth:`all_reduce_mean`, returning once it is started."""

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every agent's ``obj``, indexed by rank (diagnostics only: pickles, off the training path)."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every agent has reached this point."""

    def counters(self) -> dict[str, int]:
        """What this transport has counted, for a checkpoint (restored by :meth:`restore_counters`)."""
        return {"bytes_sent": self.bytes_sent}

    def restore_counters(self, saved: dict[str, Any]) -> None:
        """Continue counting from a checkpoint's :meth:`counters`."""
        self.bytes_sent = int(saved["bytes_sent"])

    def _count_all_reduce(self, tensor: Tensor) -> None:
        self.bytes_sent += ring_all_reduce_bytes(self.world_size, nbytes(tensor))


class _Hub:
    """Shared mailboxes of an in-memory network; one ``InMemoryTransport`` per agent thread."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.mail: dict[tuple[int, int], list[Tensor]] = {}
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)


class InMemoryTransport(Transport):
    """Agents as threads of one process, exchanging cloned tensors through a shared hub (tests, simulation)."""

    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self.hub, self.rank, self.world_size = hub, rank, hub.world_size

    @classmethod
    def network(cls, world_size: int, timeout_s: float = 60.0) -> list["InMemoryTransport"]:
        """One connected transport per agent."""
        hub = _Hub(world_size, timeout_s)
        return [cls(hub, r) for r in range(world_size)]

    def post_exchange(self, messages: Mapping[int, Tensor], round: int) -> Pending[dict[int, Tensor]]:
        hub = self.hub
        with hub.cond:
            for p, message in messages.items():
                hub.mail.setdefault((self.rank, p), []).append(message.detach().clone())
                self.bytes_sent += nbytes(message)
            hub.cond.notify_all()

        def receive() -> dict[int, Tensor]:
            received = {}
            with hub.cond:
                for p in messages:
                    box = hub.mail.setdefault((p, self.rank), [])
                    if not hub.cond.wait_for(lambda: bool(box), timeout=hub.timeout_s):
                        raise PeerError(f"no message from agent {p} within {hub.timeout_s:g} s", peer=p)
                    received[p] = box.pop(0)
            return received

        return Pending(receive)

    def _gather(self, obj: Any) -> list[Any]:
        # Two barriers: the first makes every slot visible, the second keeps a fast agent from overwriting
        # its slot (in the next collective) before a slow one has read this round.
        self.hub.slots[self.rank] = obj
        self.hub.barrier.wait()
        out = list(self.hub.slots)
        self.hub.barrier.wait()
        return out

    def post_all_reduce_mean(self, tensor: Tensor, round: int) -> Pending[Tensor]:
        # The threads meet at a barrier inside the gather, so nothing can run ahead of it: complete at once.
        self._count_all_reduce(tensor)
        parts = self._gather(tensor.detach().clone())
        out = torch.zeros_like(tensor)
        for p in parts:  # rank order: the same sum on every agent
            out += p
        return done(out / self.world_size)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._gather(obj)

    def barrier(self) -> None:
        self.hub.barrier.wait()


#: A collective off the training path (evaluation gathers, the end-of-run barrier) waits for the other agents'
#: share of the same work: by default ``timeout_s`` plus this many times what this agent's own share took.
EVAL_WAIT_FACTOR = 4.0


def set_group_timeout(seconds: float) -> None:
    # torch >= 2.6 has the public name; older releases the private one.
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timedelta(seconds=seconds))


class TorchDistTransport(Transport):
    """torch.distributed point-to-point over the default process group (gloo on CPU, nccl on GPU).

    The process group must already be initialised (see ``comm.process.distributed``). Training rounds are waited on
    by a :class:`~dif_maml_dist.comm.liveness.RoundWaiter` (within ``timeout_s``, naming who is behind from ``board``);
    collectives off the training path get ``eval_timeout_s``, or by default ``timeout_s`` plus
    ``EVAL_WAIT_FACTOR`` times the work this agent did since its previous collective (the others do the same).
    """

    def __init__(self, timeout_s: float, board: Optional[ProgressBoard] = None,
                 eval_timeout_s: Optional[float] = None, group_timeout_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``group_timeout_s``: the process group's own timeout between collectives off the training path (nccl's
        watchdog; by default ``timeout_s``), restored after each of them."""
        super().__init__()
        assert dist.is_initialized(), "init the process group first (comm.process.distributed)"
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        # gloo moves CPU tensors only: stage GPU tensors through host memory.
        self._stage_on_cpu = self.backend == "gloo"
        self.timeout_s, self.eval_timeout_s, self.clock = timeout_s, eval_timeout_s, clock
        self.group_timeout_s = group_timeout_s or timeout_s
        # gloo's wait blocks until the message is there; nccl's only orders streams (see RoundWaiter).
        self.waiter = RoundWaiter(self.rank, timeout_s, board, blocking=self.backend != "nccl")
        self._since = clock()  #: when this agent last came out of a collective or exchange

    def _wire(self, tensor: Tensor) -> Tensor:
        t = tensor.detach()
        if self._stage_on_cpu and t.is_cuda:
            t = t.cpu()
        return t.contiguous()

    def post_exchange(self, messages: Mapping[int, Tensor], round: int) -> Pending[dict[int, Tensor]]:
        if not messages:
            return done({})
        self.waiter.enter(round)
        staged: dict[int, Tensor] = {}  # by id: the full-state exchange sends one tensor to every peer
        for m in messages.values():
            if id(m) not in staged:
                staged[id(m)] = self._wire(m)
        send = {p: staged[id(m)] for p, m in messages.items()}
        recv = {p: torch.empty_like(t) for p, t in send.items()}
        ops, peer_of = [], []
        for p in messages:
            ops += [dist.P2POp(dist.isend, send[p], p), dist.P2POp(dist.irecv, recv[p], p)]
            peer_of += [p, p]
        # All sends and receives of this round are posted together, so no agent blocks on a send while its
        # peer blocks on another send: plain blocking send/recv in a fixed order deadlocks on odd cycles.
        # Each pair exchanges exactly one message per direction per round, so untagged messages cannot be
        # confused across rounds (nccl ignores tags anyway).
        # The transfers progress in the backend's own threads (gloo's device loop, nccl's stream) from here on,
        # while the caller computes. The waiter waits on every work returned (one per op on gloo, one per batch
        # on nccl) within timeout_s: a dead peer's socket closes at once, a hung one times out; either way the
        # error names who is behind.
        works = dist.batch_isend_irecv(ops)
        self.bytes_sent += sum(nbytes(t) for t in send.values())

        def receive() -> dict[int, Tensor]:
            self.waiter.post(works, peer_of, keep=(send, recv))
            self._since = self.clock()
            return {p: r.to(messages[p].device) for p, r in recv.items()}

        return Pending(receive)

    def post_all_reduce_mean(self, tensor: Tensor, round: int) -> Pending[Tensor]:
        self._count_all_reduce(tensor)
        self.waiter.enter(round)
        buf = self._wire(tensor).clone()
        try:
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)
        except RuntimeError as err:
            raise PeerError(f"the all-reduce over all agents failed ({first_line(err)})") from None

        def result() -> Tensor:
            self.waiter.post([work], [p for p in range(self.world_size) if p != self.rank], keep=buf)
            self._since = self.clock()
            return (buf / self.world_size).to(tensor.device)

        return Pending(result)

    @contextmanager
    def _off_training_path(self, what: str) -> Iterator[None]:
        """A collective at an evaluation or the end: rounds in flight settled first, then a wait sized to the
        evaluation's work instead of the exchange timeout; a failure is a PeerError naming no one."""
        self.waiter.drain()
        wait = self.eval_timeout_s or self.timeout_s + EVAL_WAIT_FACTOR * (self.clock() - self._since)
        set_group_timeout(wait)
        try:
            yield
        except RuntimeError as err:
            raise PeerError(f"{what} did not complete within {wait:.0f} s: an agent died or hung while evaluating "
                            f"({first_line(err)}) [runtime.eval_timeout_s]") from None
        finally:
            set_group_timeout(self.group_timeout_s)
            self._since = self.clock()

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._off_training_path("gathering every agent's results"):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        with self._off_training_path("waiting for every agent"):
            dist.barrier()
