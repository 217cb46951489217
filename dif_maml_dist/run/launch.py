"""From a command line to a checked run: compose the config (``composition``), check it against this launch and
decide everything once (``context.RunContext``), and own the run directory (``rundir``) — for a single run and
for every job of a sweep (``-m``), before anything is written. Every refusal is a ``UsageError``: one line, exit
status 2.

``not_retried`` keeps torchrun's restarts (``--max-restarts``) from retrying a start that was refused: they
would repeat its message, and a restarted attempt counts as a resumption, which skips the check that the run
directory holds no other run.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Iterator, NoReturn, Optional, Sequence

from dif_maml_dist.comm.process import ProcessEnv, agent_store
from dif_maml_dist.run import rundir
from dif_maml_dist.run.composition import NO_RUN_ID, Composition, UsageError, compose, one_line, parse_overrides, run_id
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.rundir import RunDirLock
from dif_maml_dist.tasks.custom import AgentDataError

EXIT_USAGE = 2  #: a mistake in the command, config or data: nothing ran
EXIT_FAILED = 3  #: the run started and failed: divergence, a peer that did not answer, a full disk
EXIT_INTERRUPTED = 130  #: stopped by Ctrl-C (SIGINT), as shells report it
EXIT_TERMINATED = 143  #: stopped by SIGTERM (a scheduler's preemption or requeue, docker stop), as shells report it


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the same clean stop as Ctrl-C (one line naming the newest checkpoint), exit status 143.

    Slurm sends it to every process of a job it preempts, requeues or cancels (then SIGKILL after its
    ``KillWait``); torchrun, stopping, sends it to its workers; so does ``docker stop``."""


def stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread. Once only: torchrun forwards the SIGTERM its
    workers got from the scheduler already, and a second one would cut the first one's stop short."""

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)

@dataclass
class Launch:
    """What ``main`` prepared before hydra runs: the run's context, (rank 0) its lock on the run directory, and
    the composition both came from."""

    ctx: RunContext
    lock: Optional[RunDirLock]
    composition: Composition


def say(message: str) -> None:
    print(f"dif_maml_dist: {message}", file=sys.stderr, flush=True)


#: How long a torchrun rank waits for rank 0 to have said why the job stops: rank 0 meets the same mistake at the
#: same point of the same checks. Past it the rank's mistake is taken to be its own (e.g. no GPU on its node).
SAID_WAIT_S = 120.0


def fail(err: BaseException, env: ProcessEnv, exit_code: int = EXIT_USAGE) -> NoReturn:
    """Leave with ``exit_code`` after one line saying ``err``, once per job.

    Every rank of a torchrun job meets a config mistake the same way; only rank 0 says it, and the others leave
    once it has (a key rank 0 sets in torchrun's store): torchrun stops the whole job at the first worker that
    exits, and would otherwise kill rank 0 before it has spoken. A rank that rank 0 does not confirm in time
    says its own mistake itself; a mistake in a rank's own data (``AgentDataError``) is said at once by that
    rank, and torchrun stops the others."""
    said = f"{env.store_namespace}/said/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{env.restart_count}"
    if isinstance(err, AgentDataError):  # this process's own data: no other rank will say it
        say(f"error: {err}")
        sys.exit(exit_code)
    if not env.under_torchrun or env.rank == 0:
        say(f"error: {err}")
        store = agent_store() if env.under_torchrun else None
        if store is not None:
            store.set(said, "1")
        sys.exit(exit_code)
    store = agent_store()
    try:
        if store is None:
            raise TimeoutError
        store.wait([said], timedelta(seconds=SAID_WAIT_S))
    except (TimeoutError, RuntimeError):  # torch's DistStoreError is a RuntimeError
        say(f"error: agent {env.rank}: {err}")
    sys.exit(exit_code)


# ------------------------------------------------------------------------------------------------- checks
def check(overrides: list[str], env: ProcessEnv, data_agents: Optional[Sequence[int]] = None) -> RunContext:
    """Every check of a start that writes nothing, cheapest first, as the process ``env`` would make it
    (``ValueError`` for a user mistake): ``prepare``'s, the sweep's (``prepare_sweep``, for each of its jobs)
    and the launch scripts' pre-flight (``dif_maml_dist.preflight``; ``data_agents``: whose data it checks)."""
    return _checked(overrides, env, data_agents)[0]


def _checked(overrides: list[str], env: ProcessEnv,
             data_agents: Optional[Sequence[int]] = None) -> tuple[RunContext, Composition]:
    composition = compose(overrides, env.sweep_job)
    cfg = composition.cfg
    run_dir = rundir.check_location(composition.run_dir)
    names_dir = "hydra.run.dir" if env.sweep_job is None else "hydra.sweep.dir"
    explicit = any(o.key_or_group == names_dir for o in parse_overrides(overrides))
    if env.under_torchrun and not explicit and os.environ.get("TORCHELASTIC_RUN_ID", "") in NO_RUN_ID:
        raise UsageError("torchrun gave this job no run id, so its ranks cannot agree on a run directory: "
                         f"pass --rdzv-id=NAME to torchrun, or {names_dir}=DIR")
    if env.sweep_job is not None and cfg.train.resume:
        raise UsageError("train.resume=true cannot continue a sweep as a whole: continue each job on its own, "
                         "with train.resume=true hydra.run.dir=SWEEP_DIR/<job number> and the job's overrides")
    resuming = cfg.train.resume or env.restart_count > 0
    if not resuming:
        rundir.check_fresh(run_dir)
    ctx = RunContext.build(cfg, env, run_dir, data_agents)
    if cfg.train.resume and env.restart_count == 0:
        rundir.check_resumable(run_dir, ctx.topology.num_agents, cfg.train.iterations, ctx.fingerprint(),
                               simulated=cfg.runtime.mode == "simulate")
    return ctx, composition


def prepare(overrides: list[str], env: ProcessEnv) -> Launch:
    """``check``, then on rank 0 the run directory's lock (``ValueError`` for a user mistake)."""
    with not_retried(env):
        ctx, composition = _checked(overrides, env)
        return Launch(ctx, own(ctx), composition)


def own(ctx: RunContext) -> Optional[RunDirLock]:
    """Rank 0's lock on the run directory, the fresh-run check repeated under it (``ValueError``)."""
    # Only rank 0 owns the directory; the other ranks write nothing before the first barrier, which they pass
    # only once rank 0 holds the lock.
    if ctx.env.rank != 0:
        return None
    lock = rundir.RunDirLock(ctx.run_dir, run_id()).acquire()
    if not ctx.resuming:
        try:  # again, now that the directory is ours: another job may have finished there in the meantime
            rundir.check_fresh(ctx.run_dir)
        except ValueError:
            lock.remove_if_unused()
            raise
    return lock


def let_go(lock: Optional[RunDirLock], code: int) -> None:
    """The run directory's lock at the end: a refused start leaves no trace; any other ending frees it."""
    if lock is not None:
        if code == EXIT_USAGE:
            lock.remove_if_unused()
        else:
            lock.release()


#: hydra's flags for a sweep: one job per combination of the comma-separated override values, each its own run
#: in ``hydra.sweep.dir/<job number>``. Any other hydra flag is left to hydra.
MULTIRUN_FLAGS = ("-m", "--multirun")


def prepare_sweep(overrides: list[str], env: ProcessEnv) -> dict[int, RunContext]:
    """Every job of a sweep checked as ``check`` checks a single run, before hydra writes anything (its
    ``multirun.yaml``, each job's record); the contexts by job number (``ValueError`` for a user mistake)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    parsed = parse_overrides(overrides)
    if any(o.key_or_group == "hydra.run.dir" for o in parsed):
        raise UsageError("-m runs a sweep, whose jobs go to hydra.sweep.dir/<job number>, so hydra.run.dir would "
                         "be ignored: give hydra.sweep.dir=DIR instead")
    try:
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as err:
        raise UsageError(one_line(err)) from None
    contexts = {}
    for number, job in enumerate(jobs):
        try:
            contexts[number] = check(job, replace(env, sweep_job=number))
        except ValueError as err:
            raise UsageError(f"sweep job {number} ({' '.join(job)}): {err}") from None
    return contexts


def _refusal_key() -> str:
    return f"dif_maml_dist/refused/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


@contextmanager
def not_retried(env: ProcessEnv) -> Iterator[None]:
    """Around a start's checks: a refusal (``ValueError``) is remembered in torchrun's store, and a restarted
    attempt of a refused job leaves at once with exit status 2, saying nothing more (the first attempt said
    it), before it has looked at, or written to, anything."""
    if env.under_torchrun and env.restart_count > 0:
        store = agent_store()
        if store is not None and store.check([_refusal_key()]):
            sys.exit(EXIT_USAGE)
    try:
        yield
    except ValueError:
        if env.under_torchrun and env.max_restarts > 0:
            store = agent_store()
            if store is not None:
                store.set(_refusal_key(), "1")
        raise


def plain(doc: str) -> str:
    """A docstring's first line as plain text, for ``--help`` (which prints RST markup literally)."""
    return doc.splitlines()[0].replace("``", "")
