"""The network's figures of a run whose agents may have left (``runtime.on_peer_failure=continue``), read off
the run directory (also by hand: ``python -m dif_maml_dist.summarize RUN_DIR``).

During such a run no agent waits for another outside its own exchanges, so nobody computes the centroid or the
disagreement as it goes. Each agent writes instead, at every evaluation, a snapshot of its parameters
(``snapshots/agent<k>/iter<N>.pt``) and, when it finishes, its final figures and its view of the network
(``agents/agent<k>.json``: the departures it learned of and its component of the surviving graph). From those
files this module writes what a networked run writes itself:

- ``metrics/network.jsonl``: at every evaluation, the centroid of the agents that had a snapshot there (the agents
  alive then), its test figures, the disagreement among them and their number;
- ``summary.json``: the usual summary over the agents that finished (the survivors), plus ``departed`` (who left,
  first learned when and by whom), ``components`` (the surviving graph's connected components) with, if the graph
  split, each component's own centroid figures, and ``missing`` (agents that neither finished nor were seen to
  leave); ``models/centroid.pt`` is the survivors' centroid.

Each finishing agent calls :func:`finish_agent`; the one whose final file completes the picture (every agent
finished or known to have left) writes the summary, whichever rank it is. Run the command by hand when that never
happened (an agent died unseen, after all its neighbours had finished); it summarises whatever is there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from dif_maml_dist.engine.figures import centroid_and_disagreement, figures
from dif_maml_dist.graphs.membership import Membership
from dif_maml_dist.run.files import save_tensors_atomic, write_json_atomic

log = logging.getLogger("dif_maml_dist")


def agent_file(run_dir: Path, agent: int) -> Path:
    return run_dir / "agents" / f"agent{agent}.json"


def snapshot_path(run_dir: Path, agent: int, iteration: int) -> Path:
    return run_dir / "snapshots" / f"agent{agent}" / f"iter{iteration}.pt"


def save_snapshot(run_dir: Path, agent: int, iteration: int, named: dict[str, torch.Tensor]) -> None:
    """Agent ``agent``'s parameters at an evaluation, for the network's figures (``LiveAgentCohort.snapshot``)."""
    path = snapshot_path(run_dir, agent, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(path, named)


def snapshots(run_dir: Path, agent: int) -> dict[int, Path]:
    """Agent ``agent``'s evaluation snapshots by iteration."""
    folder = run_dir / "snapshots" / f"agent{agent}"
    return {int(p.stem[4:]): p for p in folder.glob("iter*.pt") if p.stem[4:].isdigit()}


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    # Agents finishing together would otherwise both find the picture complete and write the summary twice.
    with open(run_dir / "agents" / ".summary.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finish_agent(ctx, final: dict[str, Any], view: dict[str, Any], wall_seconds: float) -> Optional[dict]:
    """This agent's closing act in continue mode: its final file, then the summary if it completes the picture."""
    folder = ctx.run_dir / "agents"
    folder.mkdir(exist_ok=True)
    write_json_atomic(agent_file(ctx.run_dir, ctx.env.rank), {**final, **view, "wall_seconds": wall_seconds})
    with exclusive(ctx.run_dir):
        if (ctx.run_dir / "summary.json").is_file():
            return None
        if accounting(ctx.run_dir, ctx.topology.num_agents, ctx.cfg.runtime.departures)["missing"]:
            return None
        summary = write(ctx, f"agent {ctx.env.rank}")
    from dif_maml_dist.run.rundir import RunDirLock

    RunDirLock.remove_at_end(ctx.run_dir)  # the run is over here, whichever agent finished last
    return summary


def accounting(run_dir: Path, num_agents: int, planned: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
    """Who finished (their final records), who left (the earliest record of each departure, from any survivor's
    view, or the plan: ``runtime.departures``) and who is unaccounted for."""
    finals = {}
    for k in range(num_agents):
        path = agent_file(run_dir, k)
        if path.is_file():
            finals[k] = json.loads(path.read_text())
    # The network's latest knowledge: the finished agents' membership vectors merged by maximum (an agent that
    # came back, and has not finished yet, is alive in it though a neighbour recorded its departure earlier).
    states = Membership.merged((rec["states"] for rec in finals.values() if "states" in rec), num_agents)
    gone = {m for m in Membership.departed_in(states) if m not in finals}
    departed: dict[int, dict] = {}
    for k, rec in sorted(finals.items()):
        for d in rec.get("departures", []):
            m = d["agent"]
            if m in gone and (m not in departed or d["round"] < departed[m]["round"]):
                departed[m] = {**d, "noticed_by": k}
    for m, iteration in planned:  # a planned departure no survivor saw (its neighbours left too)
        if m not in finals and m not in departed:
            departed[m] = {"agent": m, "iteration": iteration, "how": "planned (runtime.departures)"}
    missing = [k for k in range(num_agents) if k not in finals and k not in departed]
    returns = {}  # restarted agents taken back: how each came back, from its own final record
    for k, rec in sorted(finals.items()):
        if rec.get("came_back"):
            returns[k] = {"agent": k, **rec["came_back"]}
    return {"finals": finals, "departed": departed, "missing": missing, "returns": returns}


def _stack(paths: Sequence[Path], layout) -> torch.Tensor:
    return torch.stack([layout.flatten(torch.load(p, weights_only=True)) for p in paths])


def component_figures(cfg, learner, finals: Mapping[int, torch.Tensor], parts: Sequence[Sequence[int]]) -> list[dict]:
    """When the surviving graph split (``parts``: its components, from ``membership.components``): per component,
    its agents, their disagreement and their centroid's final test figures, from each survivor's final flat
    parameters ``finals``. Empty when it did not split (the summary's own figures are the whole network's)."""
    from dif_maml_dist.engine.loop import final_figures

    m = cfg.maml
    if len(parts) <= 1:
        return []
    steps = max(m.final_adapt_steps, m.eval_inner_steps)
    out = []
    for part in parts:
        c, d, _ = centroid_and_disagreement(torch.stack([finals[k] for k in part]), learner.model.layout.numel)
        f = final_figures(figures(learner.curves(c, steps, 0, learner.num_tests(True))),
                          m.eval_inner_steps, m.final_adapt_steps, "", "")
        out.append({"agents": list(part), "disagreement": d, **f})
    return out


def write(ctx, by: str) -> dict:
    """``metrics/network.jsonl`` and ``summary.json`` (and the centroid model) from the run directory."""
    from dif_maml_dist.engine.learner import Learner
    from dif_maml_dist.engine.loop import RunResult, final_figures
    from dif_maml_dist.graphs.membership import components
    from dif_maml_dist.run.outputs import write_summary

    cfg, run_dir, k_all = ctx.cfg, ctx.run_dir, ctx.topology.num_agents
    m = cfg.maml
    t0 = time.perf_counter()
    learner = Learner.build(cfg, torch.device("cpu"), getattr(torch, cfg.train.dtype), ctx.family)
    layout = learner.layout
    books = accounting(run_dir, k_all, cfg.runtime.departures)
    finals, departed = books["finals"], books["departed"]
    if not finals:
        raise ValueError(f"no agent of the run in {run_dir} has finished (no agents/agent<k>.json): nothing to "
                         f"summarize yet")
    shots = {k: snapshots(run_dir, k) for k in range(k_all)}

    # The network over time: at each evaluation, the agents that were there.
    records = []
    for it in sorted({i for s in shots.values() for i in s}):
        present = [k for k in range(k_all) if it in shots[k]]
        centroid, disagreement, rates = centroid_and_disagreement(_stack([shots[k][it] for k in present], layout),
                                                                  learner.model.layout.numel)
        stats = figures(learner.curves(centroid, m.eval_inner_steps, 0, learner.num_tests(False)))
        rec = {"iteration": it, "centroid_test_loss_pre": stats["loss"][0],
               "centroid_test_loss_post": stats["loss"][-1]}
        if "accuracy" in stats:
            rec.update(centroid_test_acc_pre=stats["accuracy"][0], centroid_test_acc_post=stats["accuracy"][-1])
        records.append({**rec, "disagreement": disagreement, **({} if rates is None else {"rate_disagreement": rates}),
                        "agents_present": len(present)})
    (run_dir / "metrics").mkdir(exist_ok=True)
    tmp = run_dir / "metrics" / "network.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(run_dir / "metrics" / "network.jsonl")

    # The end: the survivors' final models, as a whole and per component of the surviving graph.
    survivors = sorted(finals)
    last = cfg.train.iterations
    finished = [shots[k][last] for k in survivors]
    steps = max(m.final_adapt_steps, m.eval_inner_steps)
    states = _stack(finished, layout)
    centroid, disagreement, rates = centroid_and_disagreement(states, learner.model.layout.numel)
    centroid_figures = final_figures(figures(learner.curves(centroid, steps, 0, learner.num_tests(True))),
                                     m.eval_inner_steps, m.final_adapt_steps, "centroid_", "centroid_")
    parts = components(ctx.schedule.support(), [k for k in range(k_all) if k not in finals])
    per_component = component_figures(cfg, learner, dict(zip(survivors, states)), parts)
    agents = [{key: v for key, v in finals[k].items()
               if key not in ("departures", "returns", "departed", "component", "came_back", "states")}
              for k in survivors]
    network = {"agents": agents, "centroid": centroid, "disagreement": disagreement,
               **({} if rates is None else {"rate_disagreement": rates}), **centroid_figures,
               "final_eval_seconds": time.perf_counter() - t0}
    wall = max(f.get("wall_seconds", 0.0) for f in finals.values())
    extra = {"parameters": layout.numel, "on_peer_failure": "continue", "survivors": survivors,
             "departed": [departed[k] for k in sorted(departed)], "missing": books["missing"],
             "returned": [books["returns"][k] for k in sorted(books["returns"])],
             "components": parts, "split": len(parts) > 1,
             **({"component_figures": per_component} if per_component else {}), "summarized_by": by}
    return write_summary(ctx, RunResult(agents, network, wall, records), layout.unflatten, extra)


def context_of(run_dir: Path):
    """The run's decisions rebuilt from its directory (for the command)."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.graphs.schedules import build_schedule
    from dif_maml_dist.graphs.topology import build_topology, strategy_weights
    from dif_maml_dist.run.context import RunContext
    from dif_maml_dist.run.saved import run_config
    from dif_maml_dist.tasks import task_family

    cfg = run_config(run_dir)
    topology = build_topology(cfg.topology)
    weights = strategy_weights(cfg.strategy.name, topology)
    schedule = build_schedule(cfg.topology, cfg.seed, topology.graph, weights)
    return RunContext(cfg, ProcessEnv(), run_dir, torch.device("cpu"), "none", 1, topology, weights, schedule,
                      task_family(cfg), False)
