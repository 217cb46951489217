"""Process-level set-up and teardown, in one place: torchrun's environment, device, threads, process groups."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from dif_maml_dist.comm.edges import EdgeTransport
from dif_maml_dist.comm.liveness import StoreProgressBoard
from dif_maml_dist.comm.transport import InMemoryTransport, TorchDistTransport, Transport, set_group_timeout
from dif_maml_dist.config import RuntimeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessEnv:
    """Who this process is, as torchrun tells it (or a lone process, when started without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    under_torchrun: bool = False
    restart_count: int = 0  #: how often torchrun has restarted this job after a failure (--max-restarts)
    local_world_size: int = 1  #: agents on this torchrun node
    max_restarts: int = 0  #: torchrun's --max-restarts for this node
    #: this run's job number in a hydra sweep (``-m``), None outside one: every job of a sweep forms its own
    #: process group from the same torchrun store, under keys of its own
    sweep_job: Optional[int] = None
    started_at: float = field(default_factory=time.time, compare=False)  #: when this process began (``from_environ``'s call)

    @property
    def store_namespace(self) -> str:
        """Where this run's keys live in torchrun's store (which outlives its jobs and restarts)."""
        return "dif_maml_dist" if self.sweep_job is None else f"dif_maml_dist/job{self.sweep_job}"

    @classmethod
    def from_environ(cls, environ=os.environ) -> "ProcessEnv":
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), True,
                   int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)), int(environ.get("LOCAL_WORLD_SIZE", 1)),
                   int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0)))


def agent_store() -> Optional[Any]:
    """torchrun's store, which outlives its restarts of the job (``None`` without one: a lone process, or a
    launcher that serves no store to its workers)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=30), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):
        return None  # then a restart is retried, as without this


def select_device(cfg: RuntimeConfig, env: ProcessEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` when GPUs are asked for (or ``auto`` finds them), else the CPU. Over gloo, agents may
    share GPUs (``cuda:LOCAL_RANK mod GPUs``: messages go through host memory anyway); nccl needs one GPU per
    agent, since one communicator cannot hold two ranks on one device."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cfg.backend != "gloo" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu")
    gpus = torch.cuda.device_count()
    if cfg.backend == "gloo" or cfg.mode == "simulate":
        return torch.device("cuda", env.local_rank % gpus)
    if env.local_rank >= gpus:
        raise ValueError(f"local rank {env.local_rank} has no GPU of its own ({gpus} visible) and nccl needs one per "
                         f"agent: start at most {gpus} processes per node, or share the GPUs over gloo "
                         f"(runtime.backend=gloo runtime.device=cuda), or use runtime.device=cpu")
    return torch.device("cuda", env.local_rank)


def select_backend(cfg: RuntimeConfig, device: torch.device) -> str:
    if cfg.on_peer_failure == "continue":  # per-edge gloo groups (comm/edges.py); GPU tensors go through host memory
        return "gloo"
    if cfg.backend != "auto":
        if cfg.backend == "nccl" and device.type != "cuda":
            raise ValueError("runtime.backend=nccl needs GPUs, but this agent runs on the CPU (no CUDA device "
                             "visible, or runtime.device=cpu): use runtime.backend=gloo")
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def intra_op_threads(cfg: RuntimeConfig) -> int:
    """Intra-op threads of this process (on every device: a GPU rank's host work is launches and task sampling):
    ``runtime.threads``, or by default 1, for torchrun agents and both simulator engines alike.

    One thread is the only count whose cost does not depend on what else runs on the machine: a parallel region
    waits for its slowest thread, and on busy cores a descheduled OpenMP sibling makes every small operation
    wait a scheduler slice (benchmarks/bench_simulator_threads.py). It is also what makes the per-agent engine
    equal a torchrun job bit for bit, since the math libraries split reductions by thread count."""
    if cfg.threads is not None:
        return cfg.threads
    return 1


def configure_process(cfg: RuntimeConfig, threads: int) -> None:
    """Per-process numerics, set before any tensor work: thread count and (``runtime.deterministic``) PyTorch's
    deterministic algorithms."""
    torch.set_num_threads(threads)
    if cfg.deterministic:
        # cuBLAS reads its workspace setting when its first handle is created: set before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


#: Entries nccl's flight recorder keeps per process (its ring buffer of recent collectives and P2P operations).
FLIGHT_RECORDER_ENTRIES = 2000


def group_timeout_s(cfg: RuntimeConfig, backend: str) -> float:
    """The process group's own timeout during training. gloo: ``timeout_s`` (its waits raise). nccl: a backstop
    for its watchdog at twice that, so that the host-side wait (``liveness.RoundWaiter``) fires first and names
    who is behind, and the watchdog only catches what the host never waits for."""
    return cfg.timeout_s if backend != "nccl" else 2 * cfg.timeout_s


def nccl_environment(cfg: RuntimeConfig, dump_dir: Optional[Path]) -> dict[str, str]:
    """nccl's error handling, read when the process group is created: on a timeout the watchdog aborts the
    communicators and stops the process (instead of leaving kernels waiting forever) and dumps the flight
    recorder's record of recent operations into ``dump_dir`` (``agent<rank>`` files). Set only where the user
    has not set them."""
    # Each setting under both names: torch renamed the flight recorder's variables (TORCH_NCCL_* -> TORCH_FR_*).
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
           "TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
           "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES)}
    if dump_dir is not None:
        env["TORCH_FR_DUMP_TEMP_FILE"] = env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(dump_dir / "agent")
    return env


def dump_flight_recorder(dump_dir: Optional[Path], rank: int) -> Optional[Path]:
    """Write nccl's flight recorder (recent operations, with their state) to ``dump_dir/agent<rank>.pickle`` when
    the host-side wait gave up before the watchdog did; None where this build has no nccl recorder."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or dump_dir is None:
        return None
    try:
        data = dump()
        dump_dir.mkdir(parents=True, exist_ok=True)
        path = dump_dir / f"agent{rank}.pickle"
        path.write_bytes(data)
        return path
    except Exception as err:  # a diagnosis must not hide the failure being diagnosed
        log.warning("could not dump nccl's flight recorder: %s", err)
        return None


@contextmanager
def distributed(cfg: RuntimeConfig, env: ProcessEnv, device: torch.device, backend: str | None = None,
                threads: int | None = None, dump_dir: Optional[Path] = None) -> Iterator[Transport]:
    """The process group for one agent, torn down on the way out whatever happens.

    ``backend`` and ``threads``: as the run's context decided them (by default, from ``cfg``); ``dump_dir``: where
    nccl's flight recorder goes on a timeout. Without torchrun (a single process) this yields a one-agent
    in-memory transport instead.
    """
    configure_process(cfg, threads if threads is not None else intra_op_threads(cfg))
    if not env.under_torchrun:
        yield InMemoryTransport.network(1, cfg.timeout_s)[0]
        return
    backend = backend or select_backend(cfg, device)
    if device.type == "cuda":
        # nccl binds a communicator to the current device at its first use: set it before anything else.
        torch.cuda.set_device(device)
    if backend == "nccl":
        for key, value in nccl_environment(cfg, dump_dir).items():
            os.environ.setdefault(key, value)
        if dump_dir is not None:  # the watchdog writes its dump there but makes no folder
            dump_dir.mkdir(parents=True, exist_ok=True)
    # Start-up gets its own, longer timeout: agents of a multi-node job start minutes apart.
    init_timeout = timedelta(seconds=cfg.init_timeout_s)
    # torchrun's store outlives a restart (--max-restarts), and with torch 2.14 the restarted workers read the
    # failed attempt's gloo addresses from it ("connectFullMesh failed ... Connection refused"): keys are
    # prefixed with the attempt number here, so each attempt meets only its own peers. The jobs of a sweep (-m)
    # meet in the same store one after the other: each under its own namespace, or the second job would find
    # the first's keys and wait on peers that have left.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=init_timeout))
    store = dist.PrefixStore(f"{env.store_namespace}/attempt{env.restart_count}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=init_timeout,
                            device_id=device if backend == "nccl" else None)
    board = StoreProgressBoard(dist.PrefixStore("progress", store), rank, world_size,
                               interval_s=min(1.0, cfg.timeout_s / 5))
    aborted = False
    try:
        # One collective before the first point-to-point call: nccl sets up its communicators lazily, and
        # a P2P call as the very first operation can hang; on gloo it simply lines everybody up. Every agent's
        # progress key exists once it has passed.
        dist.barrier()
        group_timeout = group_timeout_s(cfg, backend)
        set_group_timeout(group_timeout)
        transport = TorchDistTransport(cfg.timeout_s, board, cfg.eval_timeout_s, group_timeout)
        yield transport
        # Leave together (normal exit only: after an error a barrier would just wait for the timeout): a rank
        # that tears down gloo while its peers still finish their last messages can abort at exit
        # ("terminate called without an active exception"; see docs/notes.md).
        transport.barrier()
    except BaseException:
        if backend == "nccl":
            # A round that never completed is still queued on the GPU: destroying the group would wait for it
            # forever. Record what was in flight, then abort the communicators instead.
            dump_flight_recorder(dump_dir, rank)
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                abort()
                aborted = True
        raise
    finally:
        board.close()
        if not aborted and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def edge_network(cfg: RuntimeConfig, env: ProcessEnv, peers: Sequence[int],
                 threads: int | None = None) -> Iterator[EdgeTransport]:
    """``runtime.on_peer_failure=continue``: this agent's gloo groups with each neighbour in ``peers``, and no
    process group over all agents (``comm/edges.py``), so nothing at start-up or teardown waits for anyone but the
    neighbours. Under torchrun only."""
    configure_process(cfg, threads if threads is not None else intra_op_threads(cfg))
    assert env.under_torchrun, "continue mode runs under torchrun (the simulator has its own departures)"
    init_timeout = timedelta(seconds=cfg.init_timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=init_timeout))
    # One namespace for the whole run, restarts included: a restarted agent must find the running network's keys
    # (its own count of starts, the edges it re-forms), unlike a torchrun restart of everyone (``distributed``).
    namespace = f"{env.store_namespace}/continue"

    def connect_store():  # a connection of its own (a TCPStore client serves one blocking wait at a time)
        return dist.PrefixStore(namespace, dist.TCPStore(store.host, store.port, is_master=False, timeout=init_timeout,
                                                         wait_for_workers=False))
    # The heartbeat on its own connection too: it must beat while this process waits in the store.
    board = StoreProgressBoard(dist.PrefixStore("progress", connect_store()), rank, world_size,
                               interval_s=min(1.0, cfg.timeout_s / 5), heartbeat=True)
    try:
        # Forming an edge waits for the neighbour (within init_timeout_s): every agent has started once its
        # edges are up, which is all the start-up barrier anyone needs here.
        yield EdgeTransport(dist.PrefixStore(namespace, store), rank, world_size, peers, cfg.timeout_s,
                            cfg.init_timeout_s, board, connect_store=connect_store)
    finally:
        board.close()
