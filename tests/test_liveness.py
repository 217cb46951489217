"""Who is behind when a round does not complete (comm/liveness.py), in one process: the stall report, the round waiter
under both shapes of work objects (gloo: one per operation, whose ``wait`` blocks; nccl: one per batch, whose
``wait`` returns at once and only ``is_completed`` tells), and the progress board over a real TCPStore. The same
waiting under real gloo processes is in test_faults.py."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from dif_maml_dist.comm.liveness import PeerError, RoundWaiter, StoreProgressBoard, stall_report
from tests.helpers import LocalProgressBoard, wait_until


def test_stall_report_names_the_neighbour_behind_or_the_laggard_further_away():
    """A neighbour that has not reached the round is blamed (not every neighbour, not the lowest-numbered one);
    when the neighbours have reached it and wait themselves, the agents furthest behind in the network are named
    instead. Catches blaming the wrong agent in a chain of waits."""
    blamed, why = stall_report(1, 6, [0, 2], {0: 6, 1: 6, 2: 5, 3: 6})
    assert blamed == [2] and why == "stopped advancing: agent 2 at round 5; this agent is at round 6"
    blamed, why = stall_report(0, 6, [1, 3], {0: 6, 1: 6, 2: 4, 3: 6})
    assert blamed == [1, 3] and "behind them: agent 2 at round 4" in why
    blamed, why = stall_report(0, 6, [1], {0: 6, 1: 7})
    assert blamed == [1] and "every agent has entered round 6" in why
    blamed, why = stall_report(0, 6, [1, 2], {})
    assert blamed == [1, 2] and "silent" in why


class GlooWork:
    """gloo's shape: one work per operation; ``wait(timeout)`` blocks, then returns or raises."""

    def __init__(self, fails: bool = False):
        self.fails, self.waited_with = fails, None

    def wait(self, timeout=None):
        self.waited_with = timeout
        if self.fails:
            raise RuntimeError("Timed out waiting 6000ms for recv operation to complete\nmore detail")


class NcclWork:
    """nccl's shape: one work per batch; ``wait()`` returns at once, ``is_completed()`` tells."""

    def __init__(self, done: bool = True, error: bool = False):
        self.done, self.error, self.waited = done, error, False

    def wait(self, timeout=None):
        self.waited = True

    def is_completed(self):
        if self.error:
            raise RuntimeError("NCCL communicator was aborted on rank 1\nstack")
        return self.done


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _waiter(blocking, board=None, clock=None):
    clock = clock or FakeClock()
    return RoundWaiter(1, 6.0, board, blocking, clock=clock, sleep=clock.sleep), clock


def test_blocking_waits_wait_on_every_work_with_the_timeout_and_name_the_failed_operations_peer():
    """gloo: every work is waited on, each with runtime.timeout_s (not the process group's start-up timeout), and
    the failing operation's peer is named with what the progress channel says. Catches zipping works with peers
    (which waited on nccl's one work only and blamed the lowest-numbered neighbour) and waits without a bound."""
    board = LocalProgressBoard({0: 6, 2: 6, 4: 5}, rank=1)
    waiter, _ = _waiter(True, board)
    waiter.enter(5)  # combination round 5: the sixth round entered
    per_op = [GlooWork(), GlooWork(), GlooWork(), GlooWork(fails=True)]
    with pytest.raises(PeerError, match=r"^no message from agent 4 \(Timed out waiting 6000ms for recv "
                                        r"operation to complete\); stopped advancing: agent 4 at round 5; this "
                                        r"agent is at round 6$") as failed:
        waiter.post(per_op, [2, 2, 4, 4])
    assert failed.value.peer == 4
    assert all(w.waited_with == timedelta(seconds=6.0) for w in per_op)
    # One work for the whole batch, in the blocking shape: the round's peers, narrowed by the channel to agent 4.
    with pytest.raises(PeerError, match=r"^no message from agent 4 \(") as failed:
        waiter.post([GlooWork(fails=True)], [2, 2, 4, 4])
    assert failed.value.peer == 4
    waiter.post([GlooWork()], [2, 2, 4, 4])  # a round that completes passes


def test_nonblocking_rounds_stay_in_flight_and_a_stalled_one_names_who_stopped_advancing():
    """nccl: ``wait`` does not block the host, so the waiter keeps one round in flight (no host synchronisation
    per iteration) and settles the older one by polling against its deadline; a round that never completes ends
    after runtime.timeout_s, counted from when it was posted, naming the neighbour the progress channel shows
    behind — neither hanging nor blaming the wrong neighbour. Catches trusting nccl's ``wait`` to block, waiting
    forever, and a deadline counted from the wrong moment."""
    board = LocalProgressBoard({0: 2, 1: 0, 2: 1}, rank=1)
    waiter, clock = _waiter(False, board)
    waiter.enter(0)
    first = NcclWork(done=True)
    waiter.post([first], [0, 0, 2, 2])
    assert first.waited and len(waiter._pending) == 1  # in flight: not polled yet
    waiter.enter(1)
    stuck = NcclWork(done=False)
    waiter.post([stuck], [0, 0, 2, 2])  # settles round 1 (complete), keeps round 2 in flight
    assert len(waiter._pending) == 1 and clock.now == 0.0
    clock.now = 1.0
    waiter.enter(2)
    posted_at = clock.now
    with pytest.raises(PeerError, match=r"^no message from agent 2 \(round 2 not complete after 6 s\); stopped "
                                        r"advancing: agent 2 at round 1; this agent is at round 2$") as failed:
        waiter.post([NcclWork()], [0, 0, 2, 2])  # settling round 2 runs into its deadline
    assert failed.value.peer == 2
    assert 6.0 <= clock.now <= 6.0 + 0.02 and clock.now > posted_at  # round 2 was posted at t = 0, not t = 1


def test_nonblocking_drain_settles_every_round_and_a_backend_error_is_a_peer_error():
    """Before a collective off the training path every round in flight is settled; a work the backend failed
    (nccl's watchdog aborted the communicator) becomes a PeerError naming the round's peers, not a raw
    RuntimeError. Catches evaluation collectives started while exchanges are still unchecked."""
    waiter, _ = _waiter(False)
    for r in range(2):
        waiter.enter(r)
        waiter.post([NcclWork()], [3, 3])
    waiter.drain()
    assert not waiter._pending
    waiter.enter(2)
    waiter.post([NcclWork(error=True)], [3, 3, 5, 5])
    with pytest.raises(PeerError, match=r"^no message from one of agents 3, 5 \(NCCL communicator was aborted "
                                        r"on rank 1\)$"):
        waiter.drain()


def test_store_board_publishes_at_a_low_rate_and_every_agent_reads_every_position():
    """Two agents' boards on one real TCPStore (the kind torchrun's rendezvous gives): each key exists as soon as
    its board is made, a round entered is readable by the other agent within the publishing interval, and a
    round entered many times over is written once per interval, not once per round. Catches a board that
    blocks the training loop on the store or never publishes while the agent waits."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    prefix = dist.PrefixStore("progress", store)
    boards = [StoreProgressBoard(prefix, r, 2, interval_s=0.2) for r in range(2)]
    try:
        assert boards[0].positions() == {0: 0, 1: 0}
        writes, main_thread = [], threading.get_ident()
        real_set = boards[1].store.set
        boards[1].store = type("Counting", (), {
            "set": lambda self, k, v: (writes.append((v, threading.get_ident())), real_set(k, v)),
            "multi_get": prefix.multi_get})()
        t0 = time.monotonic()
        for r in range(1, 2001):
            boards[1].advance(r)
        # advancing is a local assignment: the training thread never writes to the store itself
        assert all(who != main_thread for _, who in writes), writes
        wait_until(lambda: boards[0].positions().get(1) == 2000, lambda: len(writes), "round 2000 never published")
        elapsed = time.monotonic() - t0
        assert boards[0].positions() == {0: 0, 1: 2000}
        # one write per interval of 0.2 s, however long a loaded machine made the loop: never one per round
        assert 1 <= len(writes) <= elapsed / 0.2 + 2 and len(writes) < 100, (len(writes), elapsed)
    finally:
        for b in boards:
            b.close()
    assert not any(b._thread.is_alive() for b in boards)


def test_peer_watch_waits_for_a_neighbour_that_waits_and_gives_up_on_one_that_stopped():
    """The continue mode's decision to stop waiting for a neighbour's message (fake clock, fake board): before
    timeout_s nobody is given up; after it, a neighbour that still beats and whose round moved recently is waited
    for (it waits for a hung agent itself), one whose heartbeat stopped is given up after timeout_s without a beat,
    one that beats but has not moved for 2 x timeout_s is given up as stuck; without any heartbeat the plain
    timeout decides.

    Catches the cascade this guards against (an agent giving up on a neighbour that merely waits: the whole
    chain's waits expire together and the network falls apart), and a watch that waits forever for a stopped peer."""
    from dif_maml_dist.comm.liveness import PeerWatch

    now = [0.0]
    beats = {1: (10, 0), 2: (10, 0), 3: (10, 0)}

    class Board:
        def heartbeats(self):
            return dict(beats)

    watch = PeerWatch(Board(), timeout_s=10, clock=lambda: now[0])
    for t in range(0, 26):
        now[0] = float(t)
        beats[1] = (10 + (t >= 12), t)  # waits (beats), moves on at t=12 when its own wait ended
        beats[2] = (10, min(t, 3))  # stopped at t=3: no beat after
        beats[3] = (10, t)  # beats, never moves
        watch.observe()
        if t < 10:
            assert all(watch.verdict(p, t) is None for p in (1, 2, 3))
        if t >= 13:
            assert watch.verdict(1, t) is None
    assert "no heartbeat" in watch.verdict(2, 25)
    assert "stuck" in watch.verdict(3, 25)
    now[0] = 13.0
    assert watch.verdict(2, 13) is not None and watch.verdict(3, 13) is None
    blind = PeerWatch(None, timeout_s=10, clock=lambda: now[0])
    blind.observe()
    assert blind.verdict(1, 9.9) is None and "no message within 10 s" in blind.verdict(1, 10)
