"""Shared helpers for the test suite (importable from test modules and spawned worker processes)."""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dif_maml_dist.config import Config, MamlConfig, TaskConfig, TrainConfig
from dif_maml_dist.run.validate import validate

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def read_only(folder: Path):
    """``folder`` and everything below it refuse writes during the block: through the permission bits for a plain
    user; for root, which they do not stop, through a read-only bind mount of the folder onto itself (as a
    container mounts data ``:ro``). A write probe checks it; the test is skipped, saying why, where neither works."""
    import pytest

    folder = Path(folder)
    modes, mounted = {}, False
    if os.geteuid() == 0:
        try:
            proc = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True,
                                  text=True)
            problem = proc.stderr.strip() if proc.returncode != 0 else None
        except OSError as err:  # no mount(8) here
            problem = str(err)
        if problem is not None:
            pytest.skip(f"running as root, whom permission bits do not stop, and a read-only bind mount of {folder} "
                        f"failed: {problem}")
        mounted = True
        # Older mount(8) ignore ro on the bind itself and need it as a remount.
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
    else:
        modes = {p: p.stat().st_mode for p in (folder, *folder.rglob("*"))}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
    try:
        probe = folder / ".write-probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{folder} still takes writes after {'a read-only bind mount' if mounted else 'chmod a-w'}")
        yield folder
    finally:
        if mounted:  # lazily: a memory-mapped file inside would keep a plain umount busy
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
        for p, mode in modes.items():
            p.chmod(mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: How long a waited-for job may show no progress at all before a test calls it hung. A hang guard only: generous,
#: because on a saturated 2-core machine starting a torch process alone can take a minute (tests/stress.sh).
STALL_S = 300.0


def wait_until(ready, progress, what: str, stall_s: float = STALL_S, alive=lambda: True) -> None:
    """Poll until ``ready()``; fail only when ``progress()`` (any comparable value: an iteration, a file count) has
    not changed for ``stall_s`` seconds, or when ``alive()`` turns false first. Deadlines measured from the job's
    own progress, not fixed seconds, so that a loaded machine slows the test down instead of failing it."""
    import time

    last, since = progress(), time.monotonic()
    while not ready():
        if not alive():
            raise AssertionError(f"{what}: the job ended first")
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"{what}: no progress in {stall_s:.0f} s (stuck at {last!r})")
        time.sleep(0.05)


def small_config(strategy: str = "dif_maml", iterations: int = 12, optim: str = "adam", **train) -> Config:
    """A fast float64 config: few iterations, a small test set, 2 tasks per agent (loop path)."""
    cfg = Config()
    cfg.strategy.name = strategy
    cfg.optim.name = optim
    cfg.optim.lr = 0.001 if optim == "adam" else 0.005
    cfg.task = replace(TaskConfig(), eval_tasks=20, meta_batch=2)
    cfg.maml = replace(MamlConfig(), final_adapt_steps=3)
    cfg.train = replace(TrainConfig(), iterations=iterations, eval_every=max(iterations // 2, 1), log_every=4,
                        dtype="float64", save_models=False, **train)
    return validate(cfg)


def schedule_for(cfg: Config, topology):
    """The graphs of every round for ``cfg``'s strategy and schedule over ``topology`` (as ``train.py`` builds it)."""
    from dif_maml_dist.graphs.schedules import build_schedule
    from dif_maml_dist.graphs.topology import strategy_weights

    return build_schedule(cfg.topology, cfg.seed, topology.graph, strategy_weights(cfg.strategy.name, topology))


def simulated_states(cfg: Config, schedule, iterations: int, vectorize: bool = True, with_bytes: bool = False):
    """Final ``[K, P]`` parameters of the in-process simulator after ``iterations`` lock-step iterations
    (``schedule``: a GraphSchedule or a static weight matrix), and each agent's bytes if asked."""
    from dif_maml_dist.engine.simulator import Simulation

    sim = Simulation(cfg, schedule, vectorize=vectorize)
    for _ in range(iterations):
        sim.step()
    states = sim.states().detach().clone()
    return (states, list(sim.bytes_sent)) if with_bytes else states


def resumed_simulation_states(cfg: Config, weights, stop: int, iterations: int, vectorize: bool = False):
    """``[K, P]`` states of an uninterrupted simulation after ``iterations``, and of one stopped after ``stop``
    and continued from its ``state_dict`` by a new Simulation."""
    from dif_maml_dist.engine.simulator import Simulation

    whole, first = (Simulation(cfg, weights, vectorize=vectorize) for _ in range(2))
    for _ in range(stop):
        whole.step()
        first.step()
    second = Simulation(cfg, weights, vectorize=vectorize)
    second.load_state_dict(first.state_dict())
    for _ in range(iterations - stop):
        whole.step()
        second.step()
    return whole.states(), second.states()


def in_threads(fn, items) -> list:
    """``fn(item)`` for every item, each in its own thread (agents whose rounds meet in an in-memory network);
    the results in order. The first exception raised in any thread is raised here, after all threads ended."""
    import threading

    out, errors = [None] * len(items), []

    def body(i):
        try:
            out[i] = fn(items[i])
        except BaseException as err:  # surfaced below; a dead thread would otherwise just hang its peers
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # bounded by the in-memory network's timeout
    if errors:
        raise errors[0]
    return out


def reference_sgd_run(cfg: Config, weights, iterations: int, update):
    """Every agent's plain-SGD meta-learning written out: ``w <- update(w, g, i)`` for i = 1..iterations, ``w`` the
    ``[K, P]`` states (float64, from the initial models) and ``g`` their meta-gradients from
    :func:`reference_meta_gradient` on the task batches each agent's own seeded stream draws (MSE loss)."""
    import torch
    import torch.nn.functional as F

    from dif_maml_dist import seeding
    from dif_maml_dist.engine.agent import initial_params
    from dif_maml_dist.tasks import task_family

    family = task_family(cfg)
    module = family.build_model().double()
    k = weights.shape[0]
    cpu = torch.device("cpu")
    w = torch.stack([initial_params(cfg, j, torch.float64, cpu, family) for j in range(k)])
    samplers = [family.sampler(j, k) for j in range(k)]
    rngs = [seeding.generator(cfg.seed, seeding.Stream.TASKS, j) for j in range(k)]
    for i in range(1, iterations + 1):
        g = torch.stack([
            reference_meta_gradient(module, w[j], samplers[j].sample(rngs[j], cfg.task.meta_batch).to_device(
                cpu, torch.float64), cfg.maml.inner_lr, cfg.maml.inner_steps, False, F.mse_loss)
            for j in range(k)])
        w = update(w, g, i)
    return w


def reference_meta_gradient(module, flat, batch, alpha: float, steps: int, first_order: bool, criterion):
    """The MAML meta-gradient written out with nothing from maml.py or the written-out forwards: the module itself
    (functional_call) on a flat vector, plain autograd, task by task, the task mean taken before differentiating.
    The reference the meta-gradient paths are checked against."""
    import torch

    from dif_maml_dist.learning.flat import FlatLayout

    layout = FlatLayout.of(module)
    w = flat.detach().clone().requires_grad_(True)
    total = 0
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t] for a in batch.tensors())
        adapted = w
        for _ in range(steps):
            out = torch.func.functional_call(module, layout.unflatten(adapted), (xs,))
            (g,) = torch.autograd.grad(criterion(out, ys), adapted, create_graph=not first_order)
            adapted = adapted - alpha * g
        total = total + criterion(torch.func.functional_call(module, layout.unflatten(adapted), (xq,)), yq)
    (grad,) = torch.autograd.grad(total / len(batch), w)
    return grad


def combine_dense(a, phi):
    """The reference Combine for all agents at once: ``W = A^T Phi`` for stacked states ``Phi`` ``[K, P]`` (the
    project's convention written as one matrix product)."""
    import torch

    return torch.as_tensor(a, dtype=phi.dtype, device=phi.device).T @ phi


def spawn_within(fn, args: tuple, nprocs: int, seconds: float, hang: str) -> None:
    """``torch.multiprocessing`` processes running ``fn(rank, *args)``, waited for at most ``seconds`` (a hang guard
    for tests whose processes are meant to fail: they are killed and ``AssertionError(hang)`` raised past it)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + seconds
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError(hang)


def run_agent(agent, transport, sink=None, network_sink=None, progress: bool = False, checkpointer=None):
    """Train ``agent`` as one process of the network, as a torchrun worker's loop does (every agent must run this
    together: evaluation steps contain collectives)."""
    from dif_maml_dist.engine.cohorts import AgentCohort
    from dif_maml_dist.engine.loop import run_loop

    return run_loop(AgentCohort(agent, transport), None if sink is None else [sink], network_sink, progress,
                    checkpointer)


class LocalProgressBoard:
    """A progress board for agents in one process (``comm.liveness.ProgressBoard``): a shared dict."""

    def __init__(self, shared=None, rank: int = 0):
        self.shared = {} if shared is None else shared
        self.rank = rank
        self.shared.setdefault(rank, 0)

    def advance(self, round: int) -> None:
        self.shared[self.rank] = round

    def positions(self) -> dict:
        return dict(self.shared)


def figures_of(learner, params, max_steps: int, final: bool = False) -> dict:
    """``params``' test figures after 0..max_steps adaptation steps on the learner's shared test tasks."""
    from dif_maml_dist.engine.figures import figures

    return figures(learner.test_curves(params, max_steps, final))


def maml(layout, alpha: float, steps: int = 1, first_order: bool = False, **options):
    """The runtime's algorithm for ``maml.algorithm`` (default MAML) with inner rate ``alpha`` and ``steps`` inner
    steps, for a model of ``layout`` (``options``: further ``MamlConfig`` fields)."""
    from dif_maml_dist.config import MamlConfig
    from dif_maml_dist.learning.algorithms import build_algorithm

    return build_algorithm(MamlConfig(inner_lr=alpha, inner_steps=steps, first_order=first_order, **options), layout)


def is_primitive(a, tol: float = 1e-12) -> bool:
    """Whether the nonnegative square ``a`` is primitive: ``graphs.weights.support_is_primitive`` on its
    support (what ``check_weights`` decides)."""
    import numpy as np

    from dif_maml_dist.graphs.weights import support_is_primitive

    return support_is_primitive(np.asarray(a) > tol)
