#!/usr/bin/env python3
"""An emulated wide-area network on one machine: one network namespace per agent, every pair of agents joined by
a link with the latency, jitter, bandwidth and loss you set, and a decentralized run launched across them.

    sudo .venv/bin/python launch/emulated_wan.py run --agents 6 --delay-ms 20 --rate-mbit 100 \\
        --run-dir runs/wan -- strategy.overlap=true
    sudo .venv/bin/python launch/emulated_wan.py up --agents 2 --delay-ms 25    # hold the network; Ctrl-C ends it

Root is needed (network namespaces and TUN devices). Agent k lives in namespace ``<name>-k`` at 10.99.0.(k+1) on
its interface ``wan0``; ``run`` starts one torchrun node per agent in its namespace (static rendezvous on agent
0, ``GLOO_SOCKET_IFNAME=wan0``), so every byte between agents crosses an emulated link, the rendezvous store's
included. The settings and what each link carried are written to ``RUN_DIR/network.json``.

How links are emulated. Linux's ``tc netem`` is the usual tool, but many kernels (this project's CI machine among
them, and most container sandboxes) are built without ``sch_netem``. So each namespace's ``wan0`` is a TUN device
whose other end is this process: it reads every IP packet an agent sends, and delivers it to the destination's
device after the link's serialisation time (``--rate-mbit``, one queue per directed link, tail drop beyond
``--queue-packets`` as netem's ``limit``), its propagation delay (``--delay-ms``, plus normal ``--jitter-ms``,
never reordering a link's packets), or drops it (``--loss-pct``, independently per packet). TCP above it sees a
real lossy, slow, long link and retransmits as it would. One-way delay is ``--delay-ms``: a round trip is twice it.
Every directed link (k -> l) has its own bandwidth, as between sites with their own uplinks. Settings can come
from the environment too (``NET_DELAY_MS``, ``NET_JITTER_MS``, ``NET_RATE_MBIT``, ``NET_LOSS_PCT``, ``NET_MTU``).

Size: the link model, the namespaces' set-up and tear-down, and the launch across them are one tool a user runs
as root; split, its clean-up would have to be followed across files.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

SUBNET = "10.99.0"  #: agent k is SUBNET.(k+1)
INTERFACE = "wan0"
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@dataclass(frozen=True)
class Link:
    """One directed link's behaviour (every link gets the same)."""

    delay_ms: float = 0.0  #: one-way propagation delay
    jitter_ms: float = 0.0  #: standard deviation of a normal variation of the delay (no reordering)
    rate_mbit: float = 0.0  #: bandwidth in Mbit/s; 0: unlimited
    loss_pct: float = 0.0  #: independent loss probability per packet, in percent
    queue_packets: int = 1000  #: packets waiting on a link beyond which new ones are dropped (netem's limit)

    def check(self) -> None:
        for name in ("delay_ms", "jitter_ms", "rate_mbit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.loss_pct < 100:
            raise ValueError(f"--loss-pct must be in [0, 100), got {self.loss_pct}")
        if self.queue_packets < 1:
            raise ValueError(f"--queue-packets must be at least 1, got {self.queue_packets}")


@dataclass
class LinkCounters:
    packets: int = 0  #: delivered
    bytes: int = 0  #: delivered, IP headers included
    lost: int = 0  #: dropped by --loss-pct
    overflow: int = 0  #: dropped because the link's queue was full


@dataclass
class _LinkState:
    free_at: float = 0.0  #: when the link has sent everything queued so far
    last_out: float = 0.0  #: delivery time of its newest packet (later ones never overtake it)
    queued: int = 0
    counters: LinkCounters = field(default_factory=LinkCounters)


class Shaper:
    """Moves IP packets between the agents' TUN devices through emulated links (module doc), in its own thread."""

    def __init__(self, fds: list[int], link: Link, seed: int = 0):
        self.fds, self.link = fds, link
        self.rng = random.Random(seed)
        self.links: dict[tuple[int, int], _LinkState] = {}
        self.stray = 0  #: packets to no agent (IPv6 router solicitations and the like), dropped
        self._heap: list[tuple[float, int, int, int, bytes]] = []  # (deliver at, seq, link source, dest, packet)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-shaper", daemon=True)
        for fd in fds:
            os.set_blocking(fd, False)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def counters(self) -> dict[str, dict]:
        return {f"{a}->{b}": asdict(s.counters) for (a, b), s in sorted(self.links.items())}

    def _admit(self, src: int, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[12:15] != packet[16:19]:
            self.stray += 1  # not IPv4 within the subnet
            return
        dst = packet[19] - 1
        if not 0 <= dst < len(self.fds) or dst == src:
            self.stray += 1
            return
        state = self.links.setdefault((src, dst), _LinkState())
        link = self.link
        if link.loss_pct and self.rng.random() * 100 < link.loss_pct:
            state.counters.lost += 1
            return
        if state.queued >= link.queue_packets:
            state.counters.overflow += 1
            return
        sent = max(now, state.free_at) + (len(packet) * 8 / (link.rate_mbit * 1e6) if link.rate_mbit else 0.0)
        state.free_at = sent
        delay = link.delay_ms / 1e3 + (self.rng.gauss(0.0, link.jitter_ms / 1e3) if link.jitter_ms else 0.0)
        at = max(sent + max(delay, 0.0), state.last_out)
        state.last_out = at
        state.queued += 1
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, src, dst, packet))

    def _deliver(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, src, dst, packet = heapq.heappop(heap)
            state = self.links[(src, dst)]
            state.queued -= 1
            try:
                os.write(self.fds[dst], packet)
            except OSError:  # the namespace is being torn down
                continue
            state.counters.packets += 1
            state.counters.bytes += len(packet)

    def _run(self) -> None:
        source = {fd: k for k, fd in enumerate(self.fds)}
        while not self._stop.is_set():
            now = time.monotonic()
            wait = min(max(self._heap[0][0] - now, 0.0), 0.2) if self._heap else 0.2
            # select's timeout has microseconds (poll's only milliseconds): a 0.2 ms link stays 0.2 ms.
            ready, _, _ = select.select(self.fds, [], [], wait)
            now = time.monotonic()
            for fd in ready:
                while True:
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    self._admit(source[fd], packet, now)
            self._deliver(time.monotonic())


def _ip(*args: str, netns: Optional[str] = None) -> None:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class EmulatedNetwork:
    """``agents`` namespaces ``<name>-k`` with TUN interfaces, shaped by a :class:`Shaper`; a context manager that
    removes everything it made, also after an error."""

    def __init__(self, agents: int, link: Link, name: str = "dmd", mtu: int = 1500, seed: int = 0):
        if agents < 2 or agents > 250:
            raise ValueError(f"--agents must be in 2..250, got {agents}")
        if not 576 <= mtu <= 65535:
            raise ValueError(f"--mtu must be in 576..65535, got {mtu}")
        link.check()
        self.agents, self.link, self.name, self.mtu, self.seed = agents, link, name, mtu, seed
        self.namespaces = [f"{name}-{k}" for k in range(agents)]
        self.fds: list[int] = []
        self.shaper: Optional[Shaper] = None

    @staticmethod
    def address(agent: int) -> str:
        return f"{SUBNET}.{agent + 1}"

    def settings(self) -> dict:
        """What a run's ``network.json`` records."""
        return {"emulator": "tun (userspace links; launch/emulated_wan.py)", "agents": self.agents,
                "link": asdict(self.link), "mtu": self.mtu, "seed": self.seed, "interface": INTERFACE,
                "namespaces": self.namespaces, "addresses": [self.address(k) for k in range(self.agents)]}

    def __enter__(self) -> "EmulatedNetwork":
        if os.geteuid() != 0:
            raise PermissionError("the emulated network needs root (network namespaces and TUN devices): run it "
                                  "with sudo")
        if not os.path.exists("/dev/net/tun"):
            raise RuntimeError("/dev/net/tun is missing: this kernel or container has no TUN devices")
        taken = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        clash = [ns for ns in self.namespaces if ns in taken]
        if clash:
            raise RuntimeError(f"network namespace {clash[0]} exists already (another emulated network?): choose "
                               f"another --name, or remove it with: ip netns del {clash[0]}")
        try:
            for k, ns in enumerate(self.namespaces):
                fd = os.open("/dev/net/tun", os.O_RDWR)
                self.fds.append(fd)
                dev = f"dmdtun{os.getpid() % 100000}x{k}"[:15]
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
                _ip("netns", "add", ns)
                _ip("link", "set", dev, "netns", ns)  # the fd stays attached to the device in its new namespace
                _ip("link", "set", dev, "name", INTERFACE, netns=ns)
                _ip("addr", "add", f"{self.address(k)}/24", "dev", INTERFACE, netns=ns)
                _ip("link", "set", INTERFACE, "mtu", str(self.mtu), "txqueuelen", "10000", "up", netns=ns)
                _ip("link", "set", "lo", "up", netns=ns)
            self.shaper = Shaper(self.fds, self.link, self.seed)
            self.shaper.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shaper is not None:
            self.shaper.stop()
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def exec_args(self, agent: int) -> list[str]:
        """The command prefix that runs a program as agent ``agent``, in its namespace."""
        return ["ip", "netns", "exec", self.namespaces[agent], "env", f"GLOO_SOCKET_IFNAME={INTERFACE}"]


def _record_path(run_dir: Path) -> Path:
    """``RUN_DIR/network.json``, or ``network.N.json`` next to the records of earlier launches (a resumed run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, n = run_dir / "network.json", 1
    while path.exists():
        n += 1
        path = run_dir / f"network.{n}.json"
    return path


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, f"hydra.run.dir={Path(args.run_dir).resolve()}"]


def _preflight(args: argparse.Namespace) -> int:
    """Every check an agent makes at start-up (the run directory's included: a finished run is refused unless
    resumed), before any namespace is made; its one-line error is the launch's."""
    return subprocess.run([sys.executable, "-m", "dif_maml_dist.preflight", f"--nproc={args.agents}",
                           "--nproc-per-node=1", "--max-restarts=0", f"--launch=--agents {args.agents}", "--",
                           *_overrides(args)]).returncode


def _run(args: argparse.Namespace, network: EmulatedNetwork) -> int:
    overrides = _overrides(args)
    # Written before the agents start, so that a run that fails still says which network it ran on; what the
    # links carried is added at the end.
    record = _record_path(Path(args.run_dir).resolve())
    settings = {**network.settings(), "command": shlex.join(sys.argv)}
    record.write_text(json.dumps(settings, indent=2) + "\n")
    procs = []
    for k in range(network.agents):
        cmd = [*network.exec_args(k), sys.executable, "-m", "torch.distributed.run", f"--nnodes={network.agents}",
               "--nproc-per-node=1", "--rdzv-backend=static", f"--node-rank={k}",
               f"--master-addr={network.address(0)}", f"--master-port={args.port}", "--max-restarts=0",
               "-m", "dif_maml_dist.train", *overrides]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    assert network.shaper is not None
    record.write_text(json.dumps({**settings, "links": network.shaper.counters()}, indent=2) + "\n")
    return next((c for c in codes if c != 0), 0)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise SystemExit(f"emulated_wan: error: {name}={value!r} is not a number") from None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "run"), help="up: hold the network until interrupted; run: "
                                                                 "train across it (one torchrun node per agent)")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=_env_float("NET_DELAY_MS", 0.0))
    parser.add_argument("--jitter-ms", type=float, default=_env_float("NET_JITTER_MS", 0.0))
    parser.add_argument("--rate-mbit", type=float, default=_env_float("NET_RATE_MBIT", 0.0), help="0: unlimited")
    parser.add_argument("--loss-pct", type=float, default=_env_float("NET_LOSS_PCT", 0.0))
    parser.add_argument("--queue-packets", type=int, default=1000)
    parser.add_argument("--mtu", type=int, default=int(_env_float("NET_MTU", 1500)))
    parser.add_argument("--seed", type=int, default=0, help="the loss and jitter draws")
    parser.add_argument("--name", default="dmd", help="namespace prefix: agent k is in <name>-k")
    parser.add_argument("--run-dir", help="run: the run directory (network.json is written there)")
    parser.add_argument("--port", type=int, default=29500, help="run: the rendezvous port on agent 0")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]  # run: hydra overrides, after --
    link = Link(args.delay_ms, args.jitter_ms, args.rate_mbit, args.loss_pct, args.queue_packets)
    try:
        if args.command == "run" and not args.run_dir:
            raise ValueError("run needs --run-dir DIR (where the run and its network.json go)")
        if args.command == "run" and (code := _preflight(args)) != 0:
            return code
        with EmulatedNetwork(args.agents, link, args.name, args.mtu, args.seed) as network:
            if args.command == "run":
                return _run(args, network)
            print(f"ready: agents 0..{args.agents - 1} in namespaces {network.namespaces[0]}.."
                  f"{network.namespaces[-1]} at {network.address(0)}..{network.address(args.agents - 1)}; "
                  f"link {json.dumps(asdict(link))}", flush=True)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            print(json.dumps({"links": network.shaper.counters() if network.shaper else {}}), flush=True)
            return 0
    except (ValueError, PermissionError, RuntimeError) as err:
        print(f"emulated_wan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
