"""Hydra entry point, one agent per process: ``torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train``.

This is the edge of the system: it reads torchrun's environment and hydra's config, checks them, sets up the
process group, runs one agent and writes its outputs. Everything it calls is importable and testable alone.

Outputs, in the run directory shared by all ranks (``hydra.run.dir``):
``metrics/agent{k}.jsonl`` (per agent), ``metrics/network.jsonl`` (centroid and disagreement, rank 0),
``models/agent{k}.pt`` and ``models/centroid.pt``, ``logs/agent{k}.log`` and ``summary.json`` (rank 0).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import numpy as np

from .config import Config, from_omegaconf
from .schedules import GraphSchedule, build_schedule
from .topology import Topology, build_topology, mixing_rate, strategy_weights

#: The hydra config groups: conf/ beside the package in a checkout (or editable install); a wheel carries them
#: as dif_maml_dist/conf (pyproject.toml maps the top-level conf/ there).
CONF_DIR = next(d for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parent.parent / "conf")
                if (d / "config.yaml").is_file())
EXIT_USAGE = 2  #: a mistake in the command, config or data: nothing ran
EXIT_FAILED = 3  #: the run started and failed: divergence, a peer that did not answer

log = logging.getLogger("dif_maml_dist")

ConfigStore.instance().store(name="schema", node=Config)


#: torchrun's run id when it was given none (multi-node without --rdzv-id, or --master-port): not unique.
_NO_RUN_ID = ("", "none")


def _run_id() -> str:
    # Same value on every rank of a torchrun job (its rendezvous id: a fresh uuid under --standalone); a
    # timestamp and pid for a lone process. main() refuses a torchrun job whose id is not unique.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id not in _NO_RUN_ID:
        return run_id
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"


OmegaConf.register_new_resolver("dmd_run_id", _run_id, replace=True)


class UsageError(ValueError):
    """A mistake in the user's command or config: reported as one line, exit status 2."""


#: Whether an explicit ``hydra.run.dir`` existed before this launch (set in ``main``).
_RUN_DIR_EXISTED = False


def _fail(err: Exception, rank: int, run_dir: Path | None = None, exit_code: int = EXIT_USAGE) -> None:
    # Every rank fails the same way on a config error; only rank 0 says so, so the message appears once. The
    # others wait a moment before leaving: torchrun stops the whole job at the first worker that exits, and
    # would otherwise kill rank 0 before it has spoken.
    if rank != 0:
        time.sleep(5)
    if rank == 0:
        print(f"dif_maml_dist: error: {err}", file=sys.stderr, flush=True)
        # Hydra made the run directory (and its .hydra/ record) before the config could be checked. Remove it
        # only when it holds nothing but that record and was not there before: a run that never started
        # leaves nothing behind, and no earlier run's files are ever deleted.
        if (run_dir is not None and not _RUN_DIR_EXISTED and run_dir.is_dir()
                and {p.name for p in run_dir.iterdir()} <= {".hydra"}):
            shutil.rmtree(run_dir, ignore_errors=True)
    sys.exit(exit_code)


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """``group=option`` overrides must name an existing ``conf/group/option.yaml`` (one-line error otherwise)."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in groups and not (conf_dir / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            raise UsageError(f"unknown {key} {value!r}; choose one of: {', '.join(options)}")


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a directory that already holds a run's results (one-line error; nothing there is touched)."""
    metrics = run_dir / "metrics"
    if (run_dir / "summary.json").exists() or (metrics.is_dir() and any(metrics.iterdir())):
        raise UsageError(f"run directory {run_dir} already holds a run; nothing was changed there: choose a new "
                         f"hydra.run.dir=DIR")


def _asks_resume(argv: list[str]) -> bool:
    """Whether the command line sets ``train.resume`` to true (read before hydra parses it)."""
    return any(arg.lstrip("+").partition("=")[::2] in (("train.resume", "true"), ("train.resume", "True"))
               for arg in argv)


def explicit_run_dir(argv: list[str]) -> Path | None:
    """The ``hydra.run.dir=DIR`` override, if the command line gives one."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.run.dir":
            return Path(value)
    return None


@dataclass
class Plan:
    """Everything decided before any process group exists (so a bad config fails fast, on every rank)."""

    cfg: Config
    topology: Topology
    weights: np.ndarray  #: the strategy's effective combination matrix (A, 11^T/K or I)
    schedule: GraphSchedule  #: the graph and weights of every combination round (static: ``weights``)
    run_dir: Path
    #: continue from the run directory's checkpoints: asked for (train.resume), or a torchrun restart
    resuming: bool = False


def plan_run(cfg: Config, world_size: int, run_dir: Path, restart_count: int = 0) -> Plan:
    """Build and check the topology against the launch; refuse to overwrite an earlier run unless resuming it.
    Raises ``ValueError``."""
    topo = build_topology(cfg.topology)
    if cfg.runtime.mode == "simulate":
        if world_size != 1:
            raise UsageError(f"runtime=simulate runs all {topo.num_agents} agents in one process, but {world_size} "
                             f"were started: run it with python -m dif_maml_dist.train, not torchrun")
    elif topo.num_agents != world_size:
        raise UsageError(f"topology {cfg.topology.name!r} has {topo.num_agents} agents but {world_size} process(es) "
                         f"were started; launch with torchrun --nproc-per-node={topo.num_agents} "
                         f"(or choose a topology with as many agents as processes, or runtime=simulate)")
    resuming = cfg.train.resume or restart_count > 0
    if not resuming:
        check_fresh_run_dir(run_dir)
    elif restart_count == 0:
        check_resumable(run_dir)
    weights = strategy_weights(cfg.strategy.name, topo)
    return Plan(cfg, topo, weights, build_schedule(cfg.topology, cfg.seed, topo.graph, weights), run_dir, resuming)


def check_resumable(run_dir: Path) -> None:
    """``train.resume=true`` needs a run directory with checkpoints (one-line error; nothing there is touched)."""
    if not (run_dir / "checkpoints").is_dir():
        raise UsageError(f"train.resume=true, but {run_dir} holds no checkpoints to resume from (written every "
                         f"train.checkpoint_every iterations under {run_dir / 'checkpoints'})")


def check_devices(cfg: Config, env) -> None:
    """Device and backend choices this machine cannot honour (``ValueError``), before any process group."""
    from .runtime import select_backend, select_device

    device = select_device(cfg.runtime, env)
    if cfg.runtime.mode == "torchrun":
        select_backend(cfg.runtime, device)


def _log_start(plan: Plan, device) -> None:
    cfg, topo = plan.cfg, plan.topology
    log.info("run dir %s", plan.run_dir.resolve())
    log.info("%s on %s (%d agents, %s weights, lambda_2 = %.4f; effective lambda_2 = %.4f), %s lr=%g, "
             "%d iterations, %s on %s", cfg.strategy.name, topo.name, topo.num_agents, cfg.topology.weights,
             topo.lambda2, mixing_rate(plan.weights), cfg.optim.name, cfg.optim.lr, cfg.train.iterations,
             cfg.runtime.mode, device)


def _communication(cfg: Config, schedule: GraphSchedule) -> dict:
    """How the agents communicated: schedule, its mixing rate per round, local steps, compression."""
    from .gossip import consensus_steps

    rate, method = schedule.mixing()
    c = cfg.compression
    compression = {"name": c.name}
    if c.name != "none":
        gamma, zeta = consensus_steps(c)
        compression.update({"gamma": gamma, "zeta": zeta,
                            **({"ratio": c.ratio} if c.name in ("topk", "randk") else {}),
                            **({"bits": c.bits} if c.name == "qsgd" else {})})
    return {"schedule": schedule.name, "mixing_rate_per_round": rate, "mixing_rate_method": method,
            "combine_every": cfg.strategy.combine_every, "compression": compression}


def _write_summary(plan: Plan, result, named_params, extra: dict) -> dict:
    """The root's closing act: centroid model and ``summary.json`` (both written atomically)."""
    from .metrics import save_tensors_atomic, write_json_atomic

    cfg, topo, net = plan.cfg, plan.topology, result.network
    if cfg.train.save_models:
        save_tensors_atomic(plan.run_dir / "models" / "centroid.pt", named_params(net["centroid"]))
    agents = net["agents"]
    summary = {
        "strategy": cfg.strategy.name, "topology": topo.name, "weights": cfg.topology.weights,
        "num_agents": topo.num_agents, "edges": sorted(sorted(e) for e in topo.graph.edges),
        "lambda2": mixing_rate(plan.weights), "topology_lambda2": topo.lambda2,
        **_communication(cfg, plan.schedule),
        "optim": cfg.optim.name, "lr": cfg.optim.lr, "iterations": cfg.train.iterations, "seed": cfg.seed,
        "runtime": cfg.runtime.mode, **extra,
        "wall_seconds": result.wall_seconds, "final_eval_seconds": net["final_eval_seconds"],
        "centroid_test_loss": net["centroid_test_loss"], "centroid_test_loss_pre": net["centroid_test_loss_pre"],
        "centroid_adaptation_curve": net["centroid_adaptation_curve"], "disagreement": net["disagreement"],
        "mean_final_test_loss": sum(a["final_test_loss"] for a in agents) / len(agents),
        **({"centroid_test_accuracy": net["centroid_test_accuracy"],
            "centroid_test_accuracy_ci95": net["centroid_test_accuracy_ci95"],
            "centroid_accuracy_curve": net["centroid_accuracy_curve"],
            "mean_final_test_accuracy": sum(a["final_test_accuracy"] for a in agents) / len(agents)}
           if "centroid_test_accuracy" in net else {}),
        "agents": agents,
        "config": asdict(cfg),
    }
    write_json_atomic(plan.run_dir / "summary.json", summary)
    log.info("done in %.1f s: centroid test loss %.4f (after %d step), mean agent %.4f, disagreement %.3g; "
             "summary in %s", result.wall_seconds, summary["centroid_test_loss"], cfg.maml.eval_inner_steps,
             summary["mean_final_test_loss"], summary["disagreement"], plan.run_dir / "summary.json")
    return summary


@contextmanager
def _metric_sinks(run_dir: Path, agent_ids, root: bool, resume_at: int | None = None):
    """Per-agent JSONL sinks (and the root's network sink), closed however the run ends; ``resume_at``: continue
    the streams of a resumed run from that iteration."""
    from .metrics import JsonlSink

    sinks = [JsonlSink(run_dir / "metrics" / f"agent{k}.jsonl", resume_at) for k in agent_ids]
    network = JsonlSink(run_dir / "metrics" / "network.jsonl", resume_at) if root else None
    try:
        yield sinks, network
    finally:
        for sink in [*sinks, network]:
            if sink is not None:
                sink.close()


def execute(plan: Plan, env) -> dict | None:
    """Run this process's agent (or, with runtime=simulate, all agents); the root returns the run summary."""
    from . import checkpoint
    from .agent import Agent, run_agent
    from .metrics import save_tensors_atomic
    from .runtime import distributed, select_backend, select_device, setup_logging

    cfg, topo, run_dir = plan.cfg, plan.topology, plan.run_dir
    device = select_device(cfg.runtime, env)
    if cfg.runtime.mode == "simulate":
        return simulate(plan, device)
    with distributed(cfg.runtime, env, device) as transport:
        # Created only after the first barrier: every rank has passed the "fresh run directory" check by now.
        setup_logging(env.rank, run_dir / "logs")
        if env.rank == 0:
            _log_start(plan, device)
        agent = Agent(cfg, env.rank, topo.num_agents, device).connect(plan.schedule, transport)
        plan_k = plan.schedule.plan(0, env.rank)
        log.info("neighbours %s weights %s (self %.4f)%s, %d parameters, meta-gradient path %s",
                 plan_k.neighbors, [round(w, 4) for w in plan_k.neighbor_weights], plan_k.self_weight,
                 "" if plan.schedule.is_static else f" in round 0 of {plan.schedule.name}",
                 agent.layout.numel, agent.meta_grad_path)
        prints = checkpoint.fingerprint(cfg, plan.weights, agent.layout.numel)
        start = _resume(plan, env, agent, transport, prints) if plan.resuming else None
        saver = None
        if cfg.train.checkpoint_every > 0:
            saver = checkpoint.AgentCheckpoints(run_dir, env.rank, lambda: agent.checkpoint_state(transport.bytes_sent),
                                                prints, cfg.train.checkpoint_every, cfg.train.keep_checkpoints, start)
        with _metric_sinks(run_dir, [env.rank], env.rank == 0, (start or 0) if plan.resuming else None) as (
                sinks, network_sink):
            result = run_agent(agent, transport, sinks[0], network_sink, progress=env.rank == 0,
                               checkpointer=saver)
        if cfg.train.save_models:
            (run_dir / "models").mkdir(exist_ok=True)
            save_tensors_atomic(run_dir / "models" / f"agent{env.rank}.pt", agent.named_params())
        if env.rank != 0:
            return None
        return _write_summary(plan, result, agent.named_params, {
            "parameters": agent.layout.numel, "meta_grad_path": agent.meta_grad_path, "device": str(device),
            "backend": select_backend(cfg.runtime, device) if env.under_torchrun else "none",
            "resumed_from_iteration": start, "restarts": env.restart_count})


def _resume(plan: Plan, env, agent, transport, prints: dict[str, str]) -> int | None:
    """*Collective*: restore this agent from the newest iteration that every agent has a checkpoint of; that
    iteration (``None``: none yet, start from scratch — a restart before the first checkpoint).

    Agreed through the transport rather than read off one filesystem, so nodes without a shared run directory
    agree too. A failure on any rank (a checkpoint of another run, an unreadable file) is every rank's
    ``UsageError``, reported once."""
    from . import checkpoint

    start, err = None, None
    try:
        start = checkpoint.newest_common(transport.all_gather_object(checkpoint.available(plan.run_dir, env.rank)))
        if start is None and env.restart_count == 0:
            raise UsageError(f"train.resume=true, but no iteration has a checkpoint from every agent in "
                             f"{plan.run_dir / 'checkpoints'}")
        if start is not None:
            state = checkpoint.load(plan.run_dir, env.rank, start, prints)
            agent.restore(state)
            transport.bytes_sent = int(state["bytes_sent"])
    except ValueError as e:
        err = str(e)
    errors = [e for e in transport.all_gather_object(err) if e]
    if errors:
        raise UsageError(errors[0])
    if env.rank == 0:
        log.info("resuming from the checkpoints of iteration %s (restart %d)", start, env.restart_count)
    return start


def simulate(plan: Plan, device) -> dict:
    """All agents in this one process (runtime=simulate); same outputs as a torchrun job."""
    import torch

    from .loop import run_loop
    from .metrics import save_tensors_atomic
    from .runtime import cpu_threads, setup_logging
    from .simulate import Simulation

    cfg, run_dir = plan.cfg, plan.run_dir
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.runtime))
    setup_logging(0, run_dir / "logs", who="simulator")
    _log_start(plan, device)
    sim = Simulation(cfg, plan.schedule, device, vectorize=cfg.runtime.vectorize)
    with _metric_sinks(run_dir, sim.agent_ids, True) as (sinks, network_sink):
        result = run_loop(sim, sinks, network_sink, progress=True)
    if cfg.train.save_models:
        (run_dir / "models").mkdir(exist_ok=True)
        for k, params in enumerate(sim.states()):
            save_tensors_atomic(run_dir / "models" / f"agent{k}.pt", sim.named_params(params))
    return _write_summary(plan, result, sim.named_params, {
        "parameters": sim.layout.numel, "meta_grad_path": "vmap (over agents)" if sim.vectorize else "per agent",
        "device": str(device), "backend": "none"})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(node: DictConfig) -> None:
    from .runtime import ProcessEnv
    from .tasks import check_task_data
    from .transport import PeerError

    env = ProcessEnv.from_environ()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        plan = plan_run(from_omegaconf(node), env.world_size, run_dir, env.restart_count)
        check_devices(plan.cfg, env)
        check_task_data(plan.cfg, plan.topology.num_agents)
    except ValueError as err:
        _fail(err, env.rank, run_dir)
    try:
        execute(plan, env)
    except UsageError as err:  # found by every rank together (e.g. resuming another run's checkpoints)
        _fail(err, env.rank)
    except FloatingPointError as err:  # agreed by every rank: said once
        _fail(err, env.rank, exit_code=EXIT_FAILED)
    except PeerError as err:  # this rank's own view of the network: every rank says it
        print(f"dif_maml_dist: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)


def main() -> None:
    from .runtime import ProcessEnv

    global _RUN_DIR_EXISTED
    env = ProcessEnv.from_environ()
    try:
        check_group_choices(sys.argv[1:])
        run_dir = explicit_run_dir(sys.argv[1:])
        if run_dir is not None and env.restart_count == 0:
            # Checked before hydra starts: hydra would otherwise rewrite the old run's .hydra/ record first.
            if _asks_resume(sys.argv[1:]):
                check_resumable(run_dir)
            else:
                check_fresh_run_dir(run_dir)
            _RUN_DIR_EXISTED = run_dir.exists()
        elif env.under_torchrun and os.environ.get("TORCHELASTIC_RUN_ID", "") in _NO_RUN_ID:
            raise UsageError("torchrun gave this job no run id, so its ranks cannot agree on a run directory: "
                             "pass --rdzv-id=NAME to torchrun, or hydra.run.dir=DIR")
    except UsageError as err:
        _fail(err, env.rank)
    if env.rank != 0:
        # Only rank 0 writes hydra's own record of the run (.hydra/ in the run directory).
        sys.argv.append("hydra.output_subdir=null")
    if not env.under_torchrun:
        _hydra_main()
        return
    try:
        _hydra_main()
        code = 0
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    # A torchrun worker leaves without the interpreter's own teardown: every output is closed and written by
    # now, but gloo's C++ threads can still hold objects whose destruction during interpreter finalization
    # aborts the process ("terminate called without an active exception", exit -6), seen about once in 100
    # runs here even after destroy_process_group — which torchrun reports as a failed job.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
