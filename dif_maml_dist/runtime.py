"""Process-level set-up and teardown, in one place: torchrun's environment, device, process group, logging."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from .config import RuntimeConfig
from .transport import InMemoryTransport, TorchDistTransport, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessEnv:
    """Who this process is, as torchrun tells it (or a lone process, when started without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    under_torchrun: bool = False
    restart_count: int = 0  #: how often torchrun has restarted this job after a failure (--max-restarts)

    @classmethod
    def from_environ(cls, environ=os.environ) -> "ProcessEnv":
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), True,
                   int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)))


def select_device(cfg: RuntimeConfig, env: ProcessEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` when GPUs are asked for (or ``auto`` finds them), else the CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cfg.backend != "gloo" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                         f"start at most {torch.cuda.device_count()} processes per node or use runtime.device=cpu")
    return torch.device("cuda", env.local_rank)


def select_backend(cfg: RuntimeConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        if cfg.backend == "nccl" and device.type != "cuda":
            raise ValueError("runtime.backend=nccl needs GPUs, but this agent runs on the CPU (no CUDA device "
                             "visible, or runtime.device=cpu): use runtime.backend=gloo")
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def cpu_threads(cfg: RuntimeConfig) -> int:
    """Intra-op threads for this process on the CPU: ``runtime.threads``, or by default 1 per torchrun agent and
    every core this process may use for the simulator."""
    if cfg.threads is not None:
        return cfg.threads
    return len(os.sched_getaffinity(0)) if cfg.mode == "simulate" else 1


@contextmanager
def distributed(cfg: RuntimeConfig, env: ProcessEnv, device: torch.device, backend: str | None = None,
                threads: int | None = None) -> Iterator[Transport]:
    """The process group for one agent, torn down on the way out whatever happens.

    ``backend`` and ``threads``: as the run's context decided them (by default, from ``cfg``). Without torchrun
    (a single process) this yields a one-agent in-memory transport instead.
    """
    if device.type == "cpu":
        torch.set_num_threads(threads if threads is not None else cpu_threads(cfg))
    if not env.under_torchrun:
        yield InMemoryTransport.network(1, cfg.timeout_s)[0]
        return
    backend = backend or select_backend(cfg, device)
    if device.type == "cuda":
        # nccl binds a communicator to the current device at its first use: set it before anything else.
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    # torchrun's store outlives a restart (--max-restarts), and with torch 2.14 the restarted workers read the
    # failed attempt's gloo addresses from it ("connectFullMesh failed ... Connection refused"): keys are
    # prefixed with the attempt number here, so each attempt meets only its own peers.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"dif_maml_dist/attempt{env.restart_count}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    try:
        # One collective before the first point-to-point call: nccl sets up its communicators lazily, and
        # a P2P call as the very first operation can hang; on gloo it simply lines everybody up.
        dist.barrier()
        yield TorchDistTransport()
        # Leave together (normal exit only: after an error a barrier would just wait for the timeout): a rank
        # that tears down gloo while its peers still finish their last messages can abort at exit
        # ("terminate called without an active exception"; see docs/notes.md).
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _RankFormatter(logging.Formatter):
    def __init__(self, who: str):
        super().__init__(f"%(asctime)s [{who}] %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(rank: int, log_dir: Path | None = None, who: str | None = None) -> None:
    """Rank 0 logs progress to stderr; other ranks only warnings. Every rank logs INFO to its own file.

    Lines are tagged ``[agent RANK]`` (or ``who``, e.g. the simulator, which is all agents at once).
    """
    who = who or f"agent {rank}"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(_RankFormatter(who))
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / (f"agent{rank}.log" if who == f"agent {rank}" else "simulator.log"))
        fh.setFormatter(_RankFormatter(who))
        root.addHandler(fh)
