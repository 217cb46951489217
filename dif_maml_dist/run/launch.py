"""From a command line to a checked run: compose the config with hydra's compose API (the same overrides hydra
itself reads), check it against this launch and decide everything once (``context.RunContext``), and own the run
directory (``rundir``) — for a single run and for every job of a sweep (``-m``), before anything is written.
Every refusal is a ``UsageError``: one line, exit status 2.

``not_retried`` keeps torchrun's restarts (``--max-restarts``) from retrying a start that was refused: they
would repeat its message, and a restarted attempt counts as a resumption, which skips the check that the run
directory holds no other run.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NoReturn, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from dif_maml_dist.comm.process import ProcessEnv, agent_store
from dif_maml_dist.config import Config, from_omegaconf
from dif_maml_dist.run import rundir
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.rundir import RunDirLock
from dif_maml_dist.run.validate import validate

#: The hydra config groups: conf/ beside the package in a checkout (or editable install); a wheel carries them
#: as dif_maml_dist/conf (pyproject.toml maps the top-level conf/ there).
CONF_DIR = next(d for d in (Path(__file__).resolve().parents[1] / "conf", Path(__file__).resolve().parents[2] / "conf")
                if (d / "config.yaml").is_file())
EXIT_USAGE = 2  #: a mistake in the command, config or data: nothing ran
EXIT_FAILED = 3  #: the run started and failed: divergence, a peer that did not answer, a full disk
EXIT_INTERRUPTED = 130  #: stopped by Ctrl-C (SIGINT), as shells report it

ConfigStore.instance().store(name="schema", node=Config)

#: torchrun's run id when it was given none (multi-node without --rdzv-id, or --master-port): not unique.
_NO_RUN_ID = ("", "none")


@lru_cache(maxsize=None)
def _run_id() -> str:
    # Same value on every rank of a torchrun job (its rendezvous id: a fresh uuid under --standalone); a
    # timestamp and pid for a lone process. Cached: the config is composed twice (the early checks, then hydra),
    # and both must name the same directory.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id not in _NO_RUN_ID:
        return run_id
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"


OmegaConf.register_new_resolver("dmd_run_id", _run_id, replace=True)


class UsageError(ValueError):
    """A mistake in the user's command or config: reported as one line, exit status 2."""


@dataclass
class Launch:
    """What ``main`` prepared before hydra runs: the run's context and (rank 0) its lock on the run directory."""

    ctx: RunContext
    lock: Optional[RunDirLock]


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
    says its own mistake itself."""
    said = f"{env.store_namespace}/said/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{env.restart_count}"
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


# ------------------------------------------------------------------------------------------- config, checks
def parse_overrides(overrides: list[str]) -> list:
    """Hydra's own reading of the command line's overrides (quotes, ``+``/``~`` and all)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UsageError(_one_line(err)) from None


def check_group_choices(parsed: list, conf_dir: Path = CONF_DIR) -> None:
    """``group=option`` overrides must name an existing ``conf/group/option.yaml`` (one-line error otherwise)."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for o in parsed:
        key, value = o.key_or_group, o.value()
        if key in groups and isinstance(value, str) and not (conf_dir / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            raise UsageError(f"unknown {key} {value!r}; choose one of: {', '.join(options)}")


def compose(overrides: list[str], sweep_job: Optional[int] = None) -> tuple[Config, str]:
    """The validated config and run directory that hydra will compose from ``overrides`` (``ValueError``); for
    job ``sweep_job`` of a sweep (``-m``), that job's directory (``hydra.sweep.dir/hydra.sweep.subdir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(parse_overrides(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            job = [] if sweep_job is None else [f"hydra.job.num={sweep_job}"]
            node = hydra_compose("config", overrides=[*overrides, *job], return_hydra_config=True)
            run_dir = str(node.hydra.run.dir if sweep_job is None else
                          Path(node.hydra.sweep.dir) / str(node.hydra.sweep.subdir))
            with open_dict(node):
                del node["hydra"]
            return validate(from_omegaconf(node)), run_dir
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    """Hydra's message and its cause's, first lines only (the rest is hydra's advice and omegaconf's key path)."""
    first = str(err).strip().splitlines()[0].rstrip(".")
    cause = err.__cause__
    return f"{first}: {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else first


def check(overrides: list[str], env: ProcessEnv) -> RunContext:
    """Every check of a start that writes nothing, cheapest first, as the process ``env`` would make it
    (``ValueError`` for a user mistake): ``prepare``'s, the sweep's (``prepare_sweep``, for each of its jobs)
    and the launch scripts' pre-flight (``dif_maml_dist.preflight``)."""
    cfg, where = compose(overrides, env.sweep_job)
    run_dir = rundir.check_location(where)
    names_dir = "hydra.run.dir" if env.sweep_job is None else "hydra.sweep.dir"
    explicit = any(o.key_or_group == names_dir for o in parse_overrides(overrides))
    if env.under_torchrun and not explicit and os.environ.get("TORCHELASTIC_RUN_ID", "") in _NO_RUN_ID:
        raise UsageError("torchrun gave this job no run id, so its ranks cannot agree on a run directory: "
                         f"pass --rdzv-id=NAME to torchrun, or {names_dir}=DIR")
    if env.sweep_job is not None and cfg.train.resume:
        raise UsageError("train.resume=true cannot continue a sweep as a whole: continue each job on its own, "
                         "with train.resume=true hydra.run.dir=SWEEP_DIR/<job number> and the job's overrides")
    resuming = cfg.train.resume or env.restart_count > 0
    if not resuming:
        rundir.check_fresh(run_dir)
    ctx = RunContext.build(cfg, env, run_dir)
    if cfg.train.resume and env.restart_count == 0:
        rundir.check_resumable(run_dir, ctx.topology.num_agents, cfg.train.iterations, ctx.fingerprint(),
                               simulated=cfg.runtime.mode == "simulate")
    return ctx


def prepare(overrides: list[str], env: ProcessEnv) -> Launch:
    """``check``, then on rank 0 the run directory's lock (``ValueError`` for a user mistake)."""
    with not_retried(env):
        ctx = check(overrides, env)
        return Launch(ctx, own(ctx))


def own(ctx: RunContext) -> Optional[RunDirLock]:
    """Rank 0's lock on the run directory, the fresh-run check repeated under it (``ValueError``)."""
    # Only rank 0 owns the directory; the other ranks write nothing before the first barrier, which they pass
    # only once rank 0 holds the lock.
    if ctx.env.rank != 0:
        return None
    lock = rundir.RunDirLock(ctx.run_dir, _run_id()).acquire()
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
        raise UsageError(_one_line(err)) from None
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
