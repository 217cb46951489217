"""A restarted agent coming back in continue mode (``comm/edges.py``, ``gossip/tolerant.py``), in one process: the
round agreed with a neighbour whose welcome comes late, the join polls when the store fails, and why a return
failed. The live neighbours' ends are fakes or absent; the whole return under torchrun is in test_churn.py."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from dif_maml_dist.comm.edges import _HEADER_TAG, EdgeTransport
from dif_maml_dist.comm.liveness import PeerError
from dif_maml_dist.gossip.tolerant import TolerantCombiner
from dif_maml_dist.graphs.membership import Membership
from tests.helpers import STALL_S, wait_until

K = 3  # agent 0 (restarted) and its neighbours 1 and 2


class _Work:
    def __init__(self, run=lambda: None):
        self.run = run

    def wait(self, timeout=None):
        self.run()
        return True


class WelcomingGroup:
    """A live neighbour's end of the new edge, as the returning agent's thread sees it: its welcome (its round, its
    view with agent 0 departed, its parameters) can be received once ``ready`` is set; the start round the
    returning agent answers with is kept in ``answered``."""

    def __init__(self, round: int, params: torch.Tensor, ready: threading.Event | None = None):
        self.header = torch.tensor([round, 0, 1, 0, 0], dtype=torch.int64)
        self.params, self.ready, self.answered = params, ready, []

    def recv(self, tensors, src, tag):
        def arrive():
            if self.ready is not None:
                assert self.ready.wait(STALL_S), "the test never let the welcome arrive"
            tensors[0].copy_(self.header if tag == _HEADER_TAG else self.params)
        return _Work(arrive)

    def send(self, tensors, dst, tag):
        self.answered.append(int(tensors[0][0]))
        return _Work()


class ClosedGroup:
    """A neighbour that formed the edge, then closed it before sending its welcome."""

    def recv(self, tensors, src, tag):
        def fail():
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40123 This is "
                               "typically a crash\nsecond line")
        return _Work(fail)

    def send(self, tensors, dst, tag):
        return _Work()


def _restarted(timeout_s: float = 300.0, connect_timeout_s: float = 300.0) -> EdgeTransport:
    """Agent 0 of a 3-agent path 1-0-2, at its restart (its count of starts says it ran before): no edge formed yet."""
    store = dist.HashStore()
    store.add("starts/0", 1)
    t = EdgeTransport(store, 0, K, [1, 2], timeout_s, connect_timeout_s)
    assert t.joining and not t.groups
    return t


def _combiner(t: EdgeTransport) -> TolerantCombiner:
    return TolerantCombiner(0, None, t, Membership(0, K, incarnation=t.incarnation), every=1)


def test_a_late_welcome_before_the_first_combine_starts_past_the_round_the_agent_adopted():
    """Agent 1 welcomes agent 0 back from its round 10: agent 0 adopts it and exchanges from round 11. Agent 2
    (slower, at round 8) welcomes it after that but before agent 0's first combine. The round agreed on agent 2's
    edge must be one agent 0 has not reached: at least two past the adopted round 11 (``_answer_welcome``'s rule).

    Catches the rejoin round-stamp bug: ``current_round`` stayed None until the first combine, so the late welcome
    agreed on max(8 + 1, 0 + 2) = 9; agent 0, at round 11, then got agent 2's round-9 message ("its message was for
    round 9") and the two dropped each other, reporting the returned agent departed."""
    t = _restarted()
    late = threading.Event()
    groups = {1: WelcomingGroup(10, torch.full((4,), 1.0)), 2: WelcomingGroup(8, torch.full((4,), 2.0), late)}
    t._connect = lambda peer, tag, timeout_s, store=None: groups[peer]
    combiner = _combiner(t)
    params = torch.zeros(4)
    assert combiner.rejoin(params) == 11  # agent 1's round + 1 (every=1): from agent 1's welcome
    assert torch.equal(params, torch.full((4,), 1.0)) and groups[1].answered == [11] and combiner.start == {1: 11}

    late.set()  # agent 2's welcome arrives now, before agent 0's first combine (round 11)
    formed: list = []
    wait_until(lambda: formed.extend(t.formed()) or formed, lambda: len(formed), "agent 2's edge never formed")
    [(peer, box)] = formed
    assert peer == 2 and box["params"] is None  # a later welcome: its parameters are not taken
    assert groups[2].answered == [box["start"]]
    assert box["start"] >= 11 + 2, f"agent 2's edge starts at round {box['start']}, agent 0 re-enters at round 11"
    assert t.current_round == 11  # the round agent 0 re-enters at, before any combine has set it


class BrokenStore:
    """A store whose every call raises ``err``."""

    def __init__(self, err: BaseException):
        self.err = err

    def check(self, keys):
        raise self.err

    def get(self, key):
        raise self.err

    def set(self, key, value):
        raise self.err


def test_join_polls_tolerate_a_store_that_is_gone_and_raise_a_bug():
    """``poll_joins`` (and ``report_departed``) go on when the store's host is gone, whatever torch raises for it
    (its DistNetworkError / DistStoreError, a bare RuntimeError, the socket's OSError), also with a real TCPStore
    client whose server has shut down; a TypeError, a ValueError or a malformed join request propagates.

    Catches the ``except Exception: pass`` in ``poll_joins``, which hid programming errors and corrupt store
    values for ever: nobody could come back and nothing said why."""
    t = EdgeTransport(dist.HashStore(), 0, K, [], 300.0, 300.0, poll_s=0.0)  # a first start with no edges to form
    gone = [dist.DistNetworkError("failed to recv, got 0 bytes"), dist.DistStoreError("Socket Timeout"),
            RuntimeError("Connection reset by peer"), ConnectionResetError(104, "Connection reset by peer"),
            TimeoutError("timed out")]
    for err in gone:
        t.store = BrokenStore(err)
        assert t.poll_joins([1, 2]) is None, err
        t.report_departed(1, 0)

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False)
    client.set("join/1", "1 1")
    t.store = client
    del server  # its host is gone
    assert t.poll_joins([2]) is None
    t.report_departed(1, 0)

    for err in (TypeError("check() takes a list of keys"), ValueError("bad key"), AttributeError("no get")):
        t.store = BrokenStore(err)
        with pytest.raises(type(err)):
            t.poll_joins([1, 2])
    t.store = dist.HashStore()
    t.store.set("join/1", "three 1")  # malformed: not a join sequence number
    with pytest.raises(ValueError):
        t.poll_joins([1])


def test_a_return_that_fails_says_why_each_neighbour_did_not_take_it_back():
    """Agent 0 restarts; forming its edge with agent 1 fails (nobody at the other end within the connect timeout:
    a real gloo group over the store), agent 2's end closes the edge before its welcome. The PeerError names each
    neighbour with the reason its edge failed.

    Catches ``formed()`` dropping the forming thread's error: the message only said that no neighbour took the
    agent back within the time, with no trace of the connect timeout or the closed connection behind it."""
    t = _restarted(timeout_s=300.0, connect_timeout_s=0.5)
    real = t._connect
    t._connect = lambda peer, tag, timeout_s, store=None: (real(peer, tag, timeout_s, store) if peer == 1
                                                          else ClosedGroup())
    with pytest.raises(PeerError) as failed:
        _combiner(t).rejoin(torch.zeros(4))
    message = str(failed.value)
    head = ("agent 0 restarted, but no neighbour (1, 2) took it back within 600 s (2 x runtime.timeout_s): "
            "agent 1: ")
    assert message.startswith(head), message
    why1, why2 = message[len(head):].split("; agent 2: ")
    assert why1 == t.form_errors[1] and why1 not in ("", "no answer yet"), message
    assert why2 == "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40123", message
    assert "\n" not in message
