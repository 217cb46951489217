"""Hydra entry point, one agent per process: ``torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train``.

This is the edge of the system. Its steps: compose the config with hydra's compose API (the same overrides hydra
itself will read), check it and decide everything once (``context.RunContext``), check and lock the run
directory (``rundir``), let hydra write its record, run this process's agent (or, with ``runtime=simulate``, all
agents) and write the outputs (``outputs``). Every refusal happens before the run directory is touched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import Config, from_omegaconf

if TYPE_CHECKING:
    from .context import RunContext
    from .rundir import RunDirLock
    from .runtime import ProcessEnv

#: The hydra config groups: conf/ beside the package in a checkout (or editable install); a wheel carries them
#: as dif_maml_dist/conf (pyproject.toml maps the top-level conf/ there).
CONF_DIR = next(d for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parent.parent / "conf")
                if (d / "config.yaml").is_file())
EXIT_USAGE = 2  #: a mistake in the command, config or data: nothing ran
EXIT_FAILED = 3  #: the run started and failed: divergence, a peer that did not answer, a full disk
EXIT_INTERRUPTED = 130  #: stopped by Ctrl-C (SIGINT), as shells report it

log = logging.getLogger("dif_maml_dist")
_STARTED = time.time()  #: when this process began (near enough: this module is imported first)

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


def _say(message: str) -> None:
    print(f"dif_maml_dist: {message}", file=sys.stderr, flush=True)


def _fail(err: BaseException, rank: int, exit_code: int = EXIT_USAGE) -> None:
    # Every rank fails the same way on a config error; only rank 0 says so, so the message appears once. The
    # others wait a moment before leaving: torchrun stops the whole job at the first worker that exits, and
    # would otherwise kill rank 0 before it has spoken.
    if rank != 0:
        time.sleep(5)
    else:
        _say(f"error: {err}")
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
    from hydra import compose as hydra_compose, initialize_config_dir
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
            return from_omegaconf(node), run_dir
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
    and the launch scripts' pre-flight (``preflight.py``)."""
    from . import rundir
    from .context import RunContext

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
    from .preflight import not_retried

    with not_retried(env):
        ctx = check(overrides, env)
        return Launch(ctx, own(ctx))


def own(ctx: RunContext) -> Optional[RunDirLock]:
    """Rank 0's lock on the run directory, the fresh-run check repeated under it (``ValueError``)."""
    from . import rundir

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
    from dataclasses import replace

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


# ------------------------------------------------------------------------------------------------ execution
def execute(ctx: RunContext) -> Optional[dict]:
    """Run this process's agent (or, with runtime=simulate, all agents); the root returns the run summary."""
    if ctx.cfg.runtime.mode == "simulate":
        return simulate(ctx)
    if ctx.cfg.runtime.on_peer_failure == "continue":
        return execute_continuing(ctx)
    import torch

    from . import checkpoint, outputs
    from .agent import Agent, AgentCohort
    from .learner import Learner
    from .loop import run_loop
    from .runtime import distributed, setup_logging

    cfg, run_dir, rank = ctx.cfg, ctx.run_dir, ctx.env.rank
    with distributed(cfg.runtime, ctx.env, ctx.device, ctx.backend, ctx.threads,
                     dump_dir=run_dir / "flight_recorder") as transport:
        # Created only after the first barrier: rank 0 holds the run directory's lock by now.
        setup_logging(rank, run_dir / "logs")
        if ctx.is_root:
            outputs.log_start(ctx)
        learner = Learner.build(cfg, ctx.device, getattr(torch, cfg.train.dtype), ctx.family)
        agent = Agent(cfg, rank, ctx.topology.num_agents, ctx.device, learner).connect(ctx.schedule, transport)
        cohort = AgentCohort(agent, transport)
        plan = ctx.schedule.plan(0, rank)
        log.info("neighbours %s weights %s (self %.4f)%s, %d parameters, meta-gradient path %s",
                 plan.neighbors, [round(w, 4) for w in plan.neighbor_weights], plan.self_weight,
                 "" if ctx.schedule.is_static else f" in round 0 of {ctx.schedule.name}",
                 agent.layout.numel, agent.meta_grad_path)
        prints = ctx.fingerprint()
        start = checkpoint.resume(cohort, transport, run_dir, rank, prints, cfg.train.iterations,
                                  ctx.env.restart_count) if ctx.resuming else None
        saver = None
        if cfg.train.checkpoint_every > 0:
            saver = checkpoint.AgentCheckpoints(run_dir, rank, cohort.state_dict, prints, cfg.train.checkpoint_every,
                                                cfg.train.keep_checkpoints, start)
        best = None
        if cfg.train.validate and ctx.resuming:  # the best the run had found, as rank 0 has it: the same on all
            found = outputs.load_best_centroid(run_dir, agent.layout) if ctx.is_root else None
            best = transport.all_gather_object(found)[0]
            if best is not None:
                best.centroid = best.centroid.to(ctx.device, agent.dtype)

        def on_best(b):
            outputs.save_best_centroid(run_dir, b, agent.named_params(b.centroid))
        with outputs.metric_sinks(run_dir, [rank], ctx.is_root, (start or 0) if ctx.resuming else None,
                                  cfg.metrics.tensorboard) as (
                sinks, network_sink):
            result = run_loop(cohort, sinks, network_sink, progress=ctx.is_root, checkpointer=saver, best=best,
                              on_best=on_best if cfg.train.save_models else None)
        if cfg.train.save_models:
            outputs.save_models(run_dir, {rank: agent.named_params()})
        if not ctx.is_root:
            return None
        return outputs.write_summary(ctx, result, agent.named_params, {
            "parameters": agent.layout.numel, "meta_grad_path": agent.meta_grad_path, "device": str(ctx.device),
            "backend": ctx.backend, "resumed_from_iteration": start, "restarts": ctx.env.restart_count})


def execute_continuing(ctx: RunContext) -> Optional[dict]:
    """runtime.on_peer_failure=continue: this process's agent over its own edges, dropping neighbours that leave;
    the summary comes from whichever agent finishes last (``summarize.py``)."""
    import torch

    from . import checkpoint, outputs, summarize
    from .agent import Agent
    from .churn import LiveAgentCohort
    from .learner import Learner
    from .loop import run_loop
    from .membership import Membership
    from .runtime import edge_network, setup_logging

    cfg, run_dir, rank = ctx.cfg, ctx.run_dir, ctx.env.rank
    peers = sorted(ctx.schedule.support().neighbors(rank)) if cfg.strategy.name == "dif_maml" else []
    leave_at = {a: i for a, i in cfg.runtime.departures}.get(rank)
    with edge_network(cfg.runtime, ctx.env, peers, ctx.threads) as transport:
        setup_logging(rank, run_dir / "logs")
        if ctx.is_root:
            outputs.log_start(ctx)
        learner = Learner.build(cfg, ctx.device, getattr(torch, cfg.train.dtype), ctx.family)
        agent = Agent(cfg, rank, ctx.topology.num_agents, ctx.device, learner).connect(ctx.schedule, transport)
        cohort = LiveAgentCohort(agent, transport, run_dir, leave_at)
        log.info("continue mode: edges to %s, %d parameters, meta-gradient path %s", peers, agent.layout.numel,
                 agent.meta_grad_path)
        restored = start = None
        came_back = {}
        if transport.joining:  # a restart: back into the running network, nobody else rolls back
            asked = time.time()
            restored = checkpoint.restore_own(cohort, run_dir, rank, ctx.fingerprint())
            start = agent.combiner.come_back(agent.state.params) if peers else restored or 0
            agent.state.iteration = start
            came_back = {"incarnation": transport.incarnation, "restored_checkpoint": restored, "iteration": start,
                         "started_at": _STARTED, "asked_at": asked, "back_at": time.time()}
            log.warning("restart %d: own checkpoint of iteration %s restored, back in the network at iteration %d "
                        "after %.1f s", transport.incarnation, restored, start, came_back["back_at"] - asked)
        saver = None
        if cfg.train.checkpoint_every > 0:
            saver = checkpoint.AgentCheckpoints(run_dir, rank, cohort.state_dict, ctx.fingerprint(),
                                                cfg.train.checkpoint_every, cfg.train.keep_checkpoints, restored)
        with outputs.metric_sinks(run_dir, [rank], False, start, cfg.metrics.tensorboard) as (sinks, _):
            result = run_loop(cohort, sinks, None, progress=ctx.is_root, checkpointer=saver)
        if cfg.train.save_models:
            outputs.save_models(run_dir, {rank: agent.named_params()})
        # noncooperative agents exchange nothing: nobody leaves in their view
        membership = getattr(agent.combiner, "membership", None) or Membership(rank, ctx.topology.num_agents,
                                                                               transport.incarnation)
        view = membership.view(ctx.schedule.support())
        for d in view["departures"]:
            log.info("agent %d left: learned in round %d (iteration %d), %s", d["agent"], d["round"], d["iteration"],
                     d["how"])
        return summarize.finish_agent(ctx, result.agents[0], {**view, "came_back": came_back}, result.wall_seconds)


def simulate(ctx: RunContext) -> dict:
    """All agents in this one process (runtime=simulate); same outputs as a torchrun job, and checkpoints of the
    whole simulation (``checkpoints/simulator/``) to continue from with train.resume=true."""
    from . import checkpoint, outputs
    from .loop import run_loop
    from .runtime import configure_process, setup_logging
    from .simulate import Simulation

    cfg, run_dir = ctx.cfg, ctx.run_dir
    configure_process(cfg.runtime, ctx.threads)
    setup_logging(0, run_dir / "logs", who="simulator")
    outputs.log_start(ctx)
    sim = Simulation(cfg, ctx.schedule, ctx.device, vectorize=cfg.runtime.vectorize, family=ctx.family)
    prints = ctx.fingerprint()
    start = checkpoint.resume(sim, None, run_dir, checkpoint.SIMULATOR, prints,
                              cfg.train.iterations) if ctx.resuming else None
    saver = None
    if cfg.train.checkpoint_every > 0:
        saver = checkpoint.AgentCheckpoints(run_dir, checkpoint.SIMULATOR, sim.state_dict, prints,
                                            cfg.train.checkpoint_every, cfg.train.keep_checkpoints, start)

    def on_best(b):
        sim.best = b  # into the next checkpoint
        if cfg.train.save_models:
            outputs.save_best_centroid(run_dir, b, sim.named_params(b.centroid))

    with outputs.metric_sinks(run_dir, sim.agent_ids, True, start, cfg.metrics.tensorboard) as (sinks, network_sink):
        result = run_loop(sim, sinks, network_sink, progress=True, checkpointer=saver, best=sim.best,
                          on_best=on_best if cfg.train.validate else None)
    if cfg.train.save_models:
        outputs.save_models(run_dir, {k: sim.named_params(p) for k, p in enumerate(sim.states())})
    return outputs.write_summary(ctx, result, sim.named_params, {
        "parameters": sim.layout.numel, "meta_grad_path": "vmap (over agents)" if sim.vectorize else "per agent",
        "device": str(ctx.device), "backend": "none", "resumed_from_iteration": start,
        **simulated_departures(ctx, sim, result)})


def simulated_departures(ctx: RunContext, sim, result) -> dict:
    """runtime.departures in the simulator: the summary's figures are the survivors' (as a torchrun run's in
    continue mode), with who left when, the components of the surviving graph and, if it split, each
    component's figures (``summarize.component_figures``, as for a torchrun run)."""
    from .membership import components
    from .summarize import component_figures

    if ctx.cfg.runtime.on_peer_failure != "continue":
        return {}
    gone = sim.departed()
    result.network["agents"] = [a for a in result.network["agents"] if a["agent"] not in gone]
    survivors = [a["agent"] for a in result.network["agents"]]
    parts = components(ctx.schedule.support(), gone)
    states = sim.states().detach()
    per_component = component_figures(ctx.cfg, sim.learner, {k: states[k] for k in survivors}, parts)
    return {"on_peer_failure": "continue", "survivors": survivors,
            "departed": [{"agent": a, "iteration": sim.leave_at[a]} for a in sorted(gone)],
            "components": parts, "split": len(parts) > 1,
            **({"component_figures": per_component} if per_component else {})}


def _interrupted(ctx: RunContext) -> None:
    """Ctrl-C: one line from rank 0 saying where the run can be continued from."""
    from . import checkpoint

    if ctx.env.rank != 0:
        return
    simulated = ctx.cfg.runtime.mode == "simulate"
    whose = "the simulator" if simulated else "every agent"
    newest = checkpoint.newest_common(checkpoint.available(ctx.run_dir, k)
                                      for k in checkpoint.holders(ctx.topology.num_agents, simulated))
    if newest is None:
        _say(f"interrupted; no checkpoint of {whose} was written, so the run in {ctx.run_dir} cannot be "
             f"continued (train.checkpoint_every sets how often they are)")
    else:
        _say(f"interrupted; the newest checkpoint of {whose} is iteration {newest} in "
             f"{ctx.run_dir / 'checkpoints'}: continue with train.resume=true hydra.run.dir={ctx.run_dir}")


def run(ctx: RunContext) -> None:
    """``execute`` with every way a started run can end turned into one line and an exit status."""
    from .checkpoint import ResumeError
    from .rundir import disk_full, disk_hint
    from .transport import PeerError

    rank = ctx.env.rank
    try:
        execute(ctx)
    except ResumeError as err:  # found by every rank together (e.g. resuming another run's checkpoints)
        _fail(err, rank)
    except FloatingPointError as err:  # agreed by every rank: said once
        _fail(err, rank, exit_code=EXIT_FAILED)
    except PeerError as err:  # this rank's own view of the network: every rank says it
        _say(f"error: {err}{disk_hint(ctx.run_dir)}")
        sys.exit(EXIT_FAILED)
    except OSError as err:
        if not disk_full(err):
            raise
        _say(f"error: agent {rank}: no space left on the disk holding {ctx.run_dir} (writing "
             f"{getattr(err, 'filename', None) or 'its outputs'}): free space there, then continue the run with "
             f"train.resume=true")
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        _interrupted(ctx)
        sys.exit(EXIT_INTERRUPTED)


# ------------------------------------------------------------------------------------------------- hydra
_LAUNCH: Optional[Launch] = None  #: prepared by ``main`` before hydra runs ``_hydra_main``
_SWEEP: dict[int, RunContext] = {}  #: with -m: every job's context, by job number, checked by ``main``


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(node: DictConfig) -> None:
    from .context import RunContext
    from .runtime import ProcessEnv

    if _LAUNCH is not None:
        ctx = _LAUNCH.ctx
    elif _SWEEP:
        ctx = _SWEEP[HydraConfig.get().job.num]
    else:  # hydra's own flags (e.g. --cfg): checked here, after hydra has written its record
        env = ProcessEnv.from_environ()
        try:
            ctx = RunContext.build(from_omegaconf(node), env, Path(HydraConfig.get().runtime.output_dir))
        except ValueError as err:
            _fail(err, env.rank)
    assert Path(HydraConfig.get().runtime.output_dir).resolve() == ctx.run_dir.resolve(), (
        HydraConfig.get().runtime.output_dir, ctx.run_dir)
    if not _SWEEP:
        run(ctx)
        return
    # A sweep's job owns its directory as a single run does, from here (hydra has written the job's record).
    try:
        lock = own(ctx)
    except ValueError as err:
        _fail(err, ctx.env.rank)
    code = 0
    try:
        run(ctx)
    except SystemExit as leaving:
        code = leaving.code
        raise
    finally:
        let_go(lock, code)


def main() -> None:
    global _LAUNCH
    from .rundir import resume_record_dir
    from .runtime import ProcessEnv

    env = ProcessEnv.from_environ()
    overrides = sys.argv[1:]
    flags = [arg for arg in overrides if arg.startswith("-")]
    code = 0
    try:
        if not flags:
            try:
                _LAUNCH = prepare(overrides, env)
            except ValueError as err:
                _fail(err, env.rank)
            if env.rank == 0 and _LAUNCH.ctx.resuming:  # its own record, beside the first start's
                sys.argv.append(f"hydra.output_subdir={resume_record_dir(_LAUNCH.ctx.run_dir)}")
        elif all(flag in MULTIRUN_FLAGS for flag in flags):
            try:
                _SWEEP.update(prepare_sweep([arg for arg in overrides if arg not in MULTIRUN_FLAGS], env))
            except ValueError as err:
                _fail(err, env.rank)
        # Hydra's other flags (--help, --cfg, ...) are left to hydra. Only rank 0 writes hydra's records.
        if env.rank != 0:
            sys.argv.append("hydra.output_subdir=null")
        _hydra_main()
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except KeyboardInterrupt:  # before the run started, or after it ended
        code = EXIT_INTERRUPTED
    finally:
        if _LAUNCH is not None:
            let_go(_LAUNCH.lock, code)
    if not env.under_torchrun:
        sys.exit(code)
    # A torchrun worker leaves without the interpreter's own teardown: every output is closed and written by
    # now, but gloo's C++ threads can still hold objects whose destruction during interpreter finalization
    # aborts the process ("terminate called without an active exception", exit -6; docs/notes.md), which
    # torchrun reports as a failed job.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
