"""Everything a run decides before it starts, decided once: :class:`RunContext`.

Built by the entry point from the validated config and torchrun's environment, cheapest checks first, before
any process group, run directory or dataset cache is written. Components take the parts they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dif_maml_dist.comm.process import ProcessEnv, intra_op_threads, select_backend, select_device
from dif_maml_dist.config import Config
from dif_maml_dist.gossip.compression import SPARSIFIERS
from dif_maml_dist.graphs.schedules import GraphSchedule, build_schedule
from dif_maml_dist.graphs.topology import Topology, build_topology, num_agents_of, strategy_weights
from dif_maml_dist.graphs.weights import first_asymmetry
from dif_maml_dist.tasks import TaskFamily


class LaunchError(ValueError):
    """The launch does not fit the config (process count, simulator under torchrun): one line, exit status 2."""


def check_launch(cfg: Config, env: ProcessEnv, num_agents: int) -> None:
    """Whether this launch can run ``num_agents`` agents (cheap: called before any weight matrix is built)."""
    if cfg.runtime.mode == "simulate":
        if env.world_size != 1:
            raise LaunchError(f"runtime=simulate runs all {num_agents} agents in one process, but {env.world_size} "
                              f"were started: run it with python -m dif_maml_dist.train, not torchrun")
    elif num_agents != env.world_size:
        raise LaunchError(f"topology {cfg.topology.name!r} has {num_agents} agents but {env.world_size} process(es) "
                          f"were started; launch with torchrun --nproc-per-node={num_agents} "
                          f"(or choose a topology with as many agents as processes, or runtime=simulate)")
    if cfg.runtime.on_peer_failure == "continue" and env.local_world_size > 1 and env.max_restarts > 0:
        raise LaunchError(f"runtime.on_peer_failure=continue with torchrun --max-restarts={env.max_restarts} and "
                          f"{env.local_world_size} agents on one node: the node would restart all of them together, "
                          f"and none would find a neighbour alive to take it back; run one node per agent "
                          f"(launch/agent_node.sh), or drop --max-restarts")
    for agent, _ in cfg.runtime.slowdown:
        if agent >= num_agents:
            raise LaunchError(f"runtime.slowdown names agent {int(agent)}, but the topology has {num_agents} agents "
                              f"(0..{num_agents - 1})")
    for agent, _ in cfg.runtime.departures:
        if agent >= num_agents:
            raise LaunchError(f"runtime.departures names agent {agent}, but the topology has {num_agents} agents "
                              f"(0..{num_agents - 1})")
    # Nobody would be left to finish: no survivors' figures (the simulator divided by zero), and under torchrun
    # every process would end "as if killed" with status 0, having written no summary and no model.
    if len({agent for agent, _ in cfg.runtime.departures}) >= num_agents:
        raise LaunchError(f"runtime.departures lists every one of the {num_agents} agents; at least one agent must "
                          f"stay to finish the run: drop a departure")


def check_tensorboard(cfg: Config) -> None:
    """``metrics.tensorboard=true`` needs the tensorboard package, and one that imports: an installed package can
    still fail (a protobuf it does not work with), and the sinks would then fail only after the run folder exists."""
    import importlib.util

    from dif_maml_dist.run.sinks import tensorboard_import_error

    if not cfg.metrics.tensorboard:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("metrics.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
                         "(or drop metrics.tensorboard)")
    problem = tensorboard_import_error()
    if problem is not None:
        raise ValueError(f"metrics.tensorboard=true, but the tensorboard package fails to import ({problem}): "
                         f"reinstall it (pip install -e '.[tensorboard]') or drop metrics.tensorboard")


def check_compression(cfg: Config, numel: int) -> None:
    """What the configured compressor would send for a model of ``numel`` entries must be worth sending: less than
    the full state, and (sparsifiers) at least one entry's worth of ``compression.ratio``."""
    from dif_maml_dist.gossip.compression import make_compressor

    c = cfg.compression
    compressor = make_compressor(c)
    if compressor is None:
        return
    if c.name in SPARSIFIERS and c.ratio * numel < 1:
        # The sparsifier would still send one entry, but the consensus step shrinks with the ratio (topk 2.5 x
        # ratio): at a ratio below one entry the agents would barely average at all.
        raise ValueError(f"compression.ratio={c.ratio:g} keeps less than one of the model's {numel} entries (the "
                         f"consensus step shrinks with it to about 0: no averaging); use at least 1/{numel} = "
                         f"{1 / numel:.3g}")
    dtype = getattr(torch, cfg.train.dtype)
    full = numel * dtype.itemsize  # what compression=none sends
    sent = compressor.payload_bytes(numel, dtype)
    if sent >= full:  # e.g. topk at ratio 1: every value plus its int32 index, twice the bytes of float32
        ratio = c.name in SPARSIFIERS
        raise ValueError(f"compression={c.name}{f' with compression.ratio={c.ratio:g}' if ratio else ''} sends "
                         f"{sent} bytes per message, at least the {full} bytes of the full state: use compression=none"
                         f"{' (or a smaller compression.ratio)' if ratio else ''}")


def check_compressed_weights(cfg: Config, topology: Topology) -> None:
    """Compressed gossip keeps the network average only when A is symmetric (each edge's two terms cancel,
    ``gossip/schemes.py``): the built-in weight rules are, a user's weight file need not be. O(K^2)."""
    if cfg.compression.name == "none" or cfg.topology.weights != "file":
        return
    pair = first_asymmetry(topology.weights)
    if pair is None:
        return
    l, j = pair
    a = topology.weights
    raise ValueError(f"compression={cfg.compression.name} keeps the network average only with symmetric weights, "
                     f"but {Path(cfg.topology.weight_matrix)} has A[{l}, {j}] = {a[l, j]:.12g} != A[{j}, {l}] = "
                     f"{a[j, l]:.12g}: use topology.weights=metropolis, make the file symmetric, or use "
                     f"compression=none")


@dataclass
class RunContext:
    """One run's decisions: who this process is, where it writes, on what it computes, over which graph."""

    cfg: Config
    env: ProcessEnv
    run_dir: Path
    device: torch.device
    backend: str  #: gloo or nccl under torchrun; "none" for a lone process or the simulator
    threads: int  #: intra-op threads of this process (CPU and GPU ranks alike)
    topology: Topology
    weights: np.ndarray  #: the strategy's effective combination matrix (A, 11^T/K or I)
    schedule: GraphSchedule  #: the graph and weights of every combination round (static: ``weights``)
    family: TaskFamily  #: the task family (its dataset loaded and checked)
    resuming: bool  #: continue from the run directory's checkpoints (train.resume, or a torchrun restart)

    @property
    def is_root(self) -> bool:
        return self.env.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of parameters and data (``train.dtype``)."""
        return getattr(torch, self.cfg.train.dtype)

    @property
    def continuing(self) -> bool:
        """The network goes on without agents that leave (``runtime.on_peer_failure=continue``)."""
        return self.cfg.runtime.on_peer_failure == "continue"

    @property
    def peers(self) -> list[int]:
        """This process's agent's neighbours in any round (none for a strategy that exchanges nothing, or all-
        reduces)."""
        return sorted(self.schedule.support().neighbors(self.env.rank)) if self.cfg.strategy.name == "dif_maml" else []

    @property
    def leave_at(self) -> Optional[int]:
        """The iteration at which this process's agent leaves (``runtime.departures``), if it does."""
        return {a: i for a, i in self.cfg.runtime.departures}.get(self.env.rank)

    def fingerprint(self) -> dict[str, str]:
        """What this run's checkpoints must match (``checkpoint.fingerprint``): the same before hydra starts (the
        resume check) and in the run."""
        from dif_maml_dist.learning.algorithms import state_layout
        from dif_maml_dist.learning.flat import FlatLayout
        from dif_maml_dist.run.checkpoint import fingerprint

        return fingerprint(self.cfg, self.weights,
                           state_layout(self.cfg.maml, FlatLayout.of(self.family.build_model())).numel)

    @classmethod
    def build(cls, cfg: Config, env: ProcessEnv, run_dir: Path,
              data_agents: Optional[Sequence[int]] = None) -> "RunContext":
        """Check ``cfg`` against this launch and machine and decide everything, cheapest first (``ValueError``).
        ``data_agents``: whose training data to check (default: this process's agents: its rank's under torchrun,
        every agent in the simulator)."""
        from dif_maml_dist.tasks import check_task_data, task_family

        check_launch(cfg, env, num_agents_of(cfg.topology))
        check_tensorboard(cfg)
        device = select_device(cfg.runtime, env)
        backend = select_backend(cfg.runtime, device) if cfg.runtime.mode == "torchrun" else "none"
        if not env.under_torchrun:
            backend = "none"
        topology = build_topology(cfg.topology)
        check_compressed_weights(cfg, topology)
        weights = strategy_weights(cfg.strategy.name, topology)
        schedule = build_schedule(cfg.topology, cfg.seed, topology.graph, weights)
        family = task_family(cfg)
        if data_agents is None or cfg.data.agent_root is None:
            # Each agent's own data: under torchrun a process checks its own agent's only (no agent opens another's
            # files). Shared data: every process checks every agent's share, so that all meet a mistake alike.
            torchrun = cfg.runtime.mode == "torchrun" and env.under_torchrun and cfg.data.agent_root is not None
            data_agents = [env.rank] if torchrun else range(topology.num_agents)
        check_task_data(cfg, data_agents, topology.num_agents, family)
        if cfg.compression.name != "none":
            from dif_maml_dist.learning.algorithms import state_layout
            from dif_maml_dist.learning.flat import FlatLayout

            check_compression(cfg, state_layout(cfg.maml, FlatLayout.of(family.build_model())).numel)
        return cls(cfg, env, Path(run_dir), device, backend, intra_op_threads(cfg.runtime), topology, weights, schedule,
                   family, cfg.train.resume or env.restart_count > 0)
