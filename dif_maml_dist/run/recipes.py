"""The two ways a checked run (``context.RunContext``) is carried out, each as its list of steps, and every way
a started run can end turned into one line and an exit status (:func:`run`).

- :func:`networked`: this process's agent in a network of processes (torchrun). The two failure modes differ
  only in the pieces they get: ``runtime.on_peer_failure=stop`` a process group over all agents
  (``comm.process.distributed``) and a cohort whose evaluations use collectives; ``continue`` one group per
  edge (``comm.process.edge_network``), the failure-tolerant combiner, and a cohort that never waits for
  another agent (its summary comes from whichever agent finishes last, ``run/summary.py``).
- :func:`simulated`: all agents in this one process (``runtime=simulate``).

Both write the same outputs (``outputs.py``) and the same kind of checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Optional

from dif_maml_dist.comm.liveness import PeerError
from dif_maml_dist.comm.process import configure_process, distributed, edge_network
from dif_maml_dist.engine.agent import Agent, networked_agent
from dif_maml_dist.engine.cohorts import AgentCohort, LiveAgentCohort
from dif_maml_dist.engine.learner import Learner
from dif_maml_dist.engine.loop import run_loop
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.membership import components
from dif_maml_dist.run import checkpoint, outputs, summary
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.launch import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, fail, say
from dif_maml_dist.run.logs import setup_logging
from dif_maml_dist.run.rundir import disk_full, disk_hint

log = logging.getLogger("dif_maml_dist")


# ---------------------------------------------------------------------------------------------- networked
def _network(ctx: RunContext) -> AbstractContextManager:
    """This process's transport: a process group over every agent, or (continue mode) one per edge."""
    cfg = ctx.cfg
    if ctx.continuing:
        return edge_network(cfg.runtime, ctx.env, ctx.peers, ctx.threads)
    return distributed(cfg.runtime, ctx.env, ctx.device, ctx.backend, ctx.threads,
                       dump_dir=ctx.run_dir / "flight_recorder")


def _log_agent(ctx: RunContext, agent: Agent) -> None:
    if ctx.continuing:
        log.info("continue mode: edges to %s, %d parameters, meta-gradient path %s", ctx.peers, agent.layout.numel,
                 agent.meta_grad_path)
        return
    plan = ctx.schedule.plan(0, ctx.env.rank)
    log.info("neighbours %s weights %s (self %.4f)%s, %d parameters, meta-gradient path %s",
             plan.neighbors, [round(w, 4) for w in plan.neighbor_weights], plan.self_weight,
             "" if ctx.schedule.is_static else f" in round 0 of {ctx.schedule.name}",
             agent.layout.numel, agent.meta_grad_path)


def _come_back(ctx: RunContext, cohort: LiveAgentCohort, transport: Any,
               prints: dict[str, str]) -> tuple[Optional[int], int, dict]:
    """A restarted agent of continue mode: its own newest checkpoint, then back into the running network where
    its neighbours are (nobody else rolls back). Returns (restored checkpoint, iteration to continue from,
    the record of the return)."""
    agent, asked = cohort.agent, time.time()
    restored = checkpoint.restore_own(cohort, ctx.run_dir, ctx.env.rank, prints)
    start = agent.combiner.rejoin(agent.state.params)
    start = (restored or 0) if start is None else start
    agent.state.iteration = start
    record = {"incarnation": transport.incarnation, "restored_checkpoint": restored, "iteration": start,
              "started_at": ctx.env.started_at, "asked_at": asked, "back_at": time.time()}
    log.warning("restart %d: own checkpoint of iteration %s restored, back in the network at iteration %d after "
                "%.1f s", transport.incarnation, restored, start, record["back_at"] - asked)
    return restored, start, record


def networked(ctx: RunContext) -> Optional[dict]:
    """This process's agent, trained with its neighbours (module doc); the run summary where this process
    writes it (rank 0 in stop mode; in continue mode, the agent that finishes last), else None."""
    cfg, run_dir, rank = ctx.cfg, ctx.run_dir, ctx.env.rank
    with _network(ctx) as transport:
        # Created only after the first barrier (stop mode): rank 0 holds the run directory's lock by now.
        setup_logging(rank, run_dir / "logs")
        if ctx.is_root:
            outputs.log_start(ctx)
        learner = Learner.build(cfg, ctx.device, ctx.dtype, ctx.family, agents=[rank],
                                num_agents=ctx.topology.num_agents)
        agent = networked_agent(cfg, rank, ctx.topology.num_agents, ctx.schedule, transport, ctx.device, learner)
        _log_agent(ctx, agent)
        prints = ctx.fingerprint()
        came_back: dict = {}
        if ctx.continuing:
            cohort = LiveAgentCohort(agent, transport, partial(summary.save_snapshot, run_dir, rank), ctx.leave_at)
            saved_at = start = None
            if transport.joining:
                saved_at, start, came_back = _come_back(ctx, cohort, transport, prints)
            sinks_from, best = start, None
        else:
            cohort = AgentCohort(agent, transport)
            start = checkpoint.resume(cohort, transport, run_dir, rank, prints, cfg.train.iterations,
                                      ctx.env.restart_count) if ctx.resuming else None
            saved_at = start
            sinks_from = (start or 0) if ctx.resuming else None
            best = outputs.shared_best_centroid(run_dir, agent.layout, transport, ctx.is_root, ctx.device,
                                                ctx.dtype) if cfg.train.validate and ctx.resuming else None
        saver = checkpoint.AgentCheckpoints(run_dir, rank, cohort.state_dict, prints, cfg.train.checkpoint_every,
                                            cfg.train.keep_checkpoints, saved_at) if cfg.train.checkpoint_every else None

        def on_best(b):
            outputs.save_best_centroid(run_dir, b, agent.named_params(b.centroid))
        with outputs.metric_sinks(run_dir, [rank], cohort.is_root, sinks_from, cfg.metrics.tensorboard) as (
                sinks, network_sink):
            result = run_loop(cohort, sinks, network_sink, progress=ctx.is_root, checkpointer=saver, best=best,
                              on_best=on_best if cfg.train.save_models and not ctx.continuing else None)
        if cfg.train.save_models:
            outputs.save_models(run_dir, {rank: agent.named_params()})
        if ctx.continuing:
            view = agent.combiner.view(ctx.schedule.support())
            for d in view["departures"]:
                log.info("agent %d left: learned in round %d (iteration %d), %s", d["agent"], d["round"],
                         d["iteration"], d["how"])
            return summary.finish_agent(ctx, result.agents[0], {**view, "came_back": came_back}, result.wall_seconds)
        if not ctx.is_root:
            return None
        return outputs.write_summary(ctx, result, agent.named_params, {
            "parameters": agent.layout.numel, "meta_grad_path": agent.meta_grad_path, "device": str(ctx.device),
            "backend": ctx.backend, "resumed_from_iteration": start, "restarts": ctx.env.restart_count})


# ---------------------------------------------------------------------------------------------- simulated
def simulated(ctx: RunContext) -> dict:
    """All agents in this one process (runtime=simulate); same outputs as a torchrun job, and checkpoints of the
    whole simulation (``checkpoints/simulator/``) to continue from with train.resume=true."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    configure_process(cfg.runtime, ctx.threads)
    setup_logging(0, run_dir / "logs", who="simulator")
    outputs.log_start(ctx)
    sim = Simulation(cfg, ctx.schedule, ctx.device, vectorize=cfg.runtime.vectorize, family=ctx.family)
    prints = ctx.fingerprint()
    start = checkpoint.resume(sim, None, run_dir, checkpoint.SIMULATOR, prints,
                              cfg.train.iterations) if ctx.resuming else None
    saver = checkpoint.AgentCheckpoints(run_dir, checkpoint.SIMULATOR, sim.state_dict, prints,
                                        cfg.train.checkpoint_every, cfg.train.keep_checkpoints,
                                        start) if cfg.train.checkpoint_every else None

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


def simulated_departures(ctx: RunContext, sim: Simulation, result) -> dict:
    """runtime.departures in the simulator: the summary's figures are the survivors' (as a torchrun run's in
    continue mode), with who left when, the components of the surviving graph and, if it split, each
    component's figures (``summary.component_figures``, as for a torchrun run)."""
    if not ctx.continuing:
        return {}
    gone = sim.departed()
    result.network["agents"] = [a for a in result.network["agents"] if a["agent"] not in gone]
    survivors = [a["agent"] for a in result.network["agents"]]
    parts = components(ctx.schedule.support(), gone)
    states = sim.states().detach()
    per_component = summary.component_figures(ctx.cfg, sim.learner, {k: states[k] for k in survivors}, parts)
    return {"on_peer_failure": "continue", "survivors": survivors,
            "departed": [{"agent": a, "iteration": sim.leave_at[a]} for a in sorted(gone)],
            "components": parts, "split": len(parts) > 1,
            **({"component_figures": per_component} if per_component else {})}


# ------------------------------------------------------------------------------------------------ endings
def _interrupted(ctx: RunContext, how: str = "interrupted") -> None:
    """Ctrl-C or SIGTERM (``how``): one line from rank 0 saying where the run can be continued from."""
    if ctx.env.rank != 0:
        return
    simulated = ctx.cfg.runtime.mode == "simulate"
    whose = "the simulator" if simulated else "every agent"
    newest = checkpoint.newest_common(checkpoint.available(ctx.run_dir, k)
                                      for k in checkpoint.holders(ctx.topology.num_agents, simulated))
    if newest is None:
        say(f"{how}; no checkpoint of {whose} was written, so the run in {ctx.run_dir} cannot be "
            f"continued (train.checkpoint_every sets how often they are)")
    else:
        say(f"{how}; the newest checkpoint of {whose} is iteration {newest} in "
            f"{ctx.run_dir / 'checkpoints'}: continue with train.resume=true hydra.run.dir={ctx.run_dir}")


def run(ctx: RunContext) -> None:
    """The run (:func:`simulated` or :func:`networked`) with every way it can end turned into one line and an
    exit status."""
    rank = ctx.env.rank
    try:
        simulated(ctx) if ctx.cfg.runtime.mode == "simulate" else networked(ctx)
    except checkpoint.ResumeError as err:  # found by every rank together (e.g. resuming another run's checkpoints)
        fail(err, ctx.env)
    except FloatingPointError as err:  # agreed by every rank: said once
        fail(err, ctx.env, exit_code=EXIT_FAILED)
    except PeerError as err:  # this rank's own view of the network: every rank says it
        say(f"error: {err}{disk_hint(ctx.run_dir)}")
        sys.exit(EXIT_FAILED)
    except OSError as err:
        if not disk_full(err):
            raise
        say(f"error: agent {rank}: no space left on the disk holding {ctx.run_dir} (writing "
            f"{getattr(err, 'filename', None) or 'its outputs'}): free space there, then continue the run with "
            f"train.resume=true")
        sys.exit(EXIT_FAILED)
    except Terminated:
        _interrupted(ctx, "terminated (SIGTERM)")
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        _interrupted(ctx)
        sys.exit(EXIT_INTERRUPTED)
