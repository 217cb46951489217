"""What a run writes: its log's first lines, its metric streams, its models and ``summary.json``.

Layout of the run directory (shared by all ranks): ``metrics/agent{k}.jsonl`` (per agent),
``metrics/network.jsonl`` (centroid and disagreement, rank 0), ``models/agent{k}.pt`` and ``models/centroid.pt``,
``logs/agent{k}.log``, ``summary.json`` (rank 0); ``checkpoints/`` (``checkpoint.py``) and ``.hydra/``
(hydra's record; ``.hydra/resume-N`` for each resumed start).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from torch import Tensor

from dif_maml_dist.config import Config
from dif_maml_dist.engine.loop import BestCentroid, MetricsSink, RunResult
from dif_maml_dist.gossip.compression import SPARSIFIERS
from dif_maml_dist.graphs.schedules import GraphSchedule
from dif_maml_dist.graphs.weights import mixing_rate
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.files import save_tensors_atomic, write_json_atomic
from dif_maml_dist.run.sinks import JsonlSink, TeeSink, TensorBoardSink

log = logging.getLogger("dif_maml_dist")
#: The folders a run writes into: tools that read a run (evaluate, report) never write there.
RUN_OWN_DIRS = ("models", "metrics", "checkpoints", "logs", ".hydra", "flight_recorder", "tensorboard", "snapshots",
                "agents")
#: ``summary.json`` records the strategy's combination weights (``edge_weights``, ``self_weights``) for networks of
#: up to this many agents: the report labels each drawn edge with its weight up to there, and draws larger graphs
#: unlabelled from ``edges`` and the strategy (``report.topology_to_draw``), so the summary stays small for large K
#: (a centralized run's weights cover all K(K-1)/2 pairs).
RECORD_WEIGHTS_UP_TO = 30


def log_start(ctx: RunContext) -> None:
    """The run's first log lines: where it writes, what it runs, on which graph and device."""
    cfg, topo = ctx.cfg, ctx.topology
    # The rate the rounds actually mix at, the summary's mixing_rate_per_round: under a changing graph the base
    # matrix's lambda_2 is not what the run combines with.
    rate, _ = ctx.schedule.mixing()
    label = "effective lambda_2" if ctx.schedule.is_static else f"{ctx.schedule.name} mixing rate per round"
    log.info("run dir %s", ctx.run_dir.resolve())
    log.info("%s on %s (%d agents, %s weights, lambda_2 = %s; %s = %s), %s lr=%g, %d iterations, %s on %s",
             cfg.strategy.name + ("" if cfg.maml.algorithm == "maml" else f" with {cfg.maml.algorithm}"), topo.name,
             topo.num_agents, cfg.topology.weights, _rate(topo.lambda2), label,
             _rate(rate), cfg.optim.name, cfg.optim.lr, cfg.train.iterations, cfg.runtime.mode, ctx.device)


def _rate(value: float | None) -> str:
    return "not computed (too many agents)" if value is None else f"{value:.4f}"


def communication(cfg: Config, schedule: GraphSchedule) -> dict:
    """How the agents communicated: schedule, its mixing rate per round, local steps, compression."""
    from dif_maml_dist.gossip.schemes import consensus_steps

    rate, method = schedule.mixing()
    c = cfg.compression
    compression = {"name": c.name}
    if c.name != "none":
        gamma, zeta = consensus_steps(c)
        compression.update({"gamma": gamma, "zeta": zeta,
                            **({"ratio": c.ratio} if c.name in SPARSIFIERS else {}),
                            **({"bits": c.bits} if c.name == "qsgd" else {})})
    return {"schedule": schedule.name, "mixing_rate_per_round": rate, "mixing_rate_method": method,
            "combine_every": cfg.strategy.combine_every, "compression": compression}


def recorded_weights(weights: np.ndarray) -> dict:
    """What ``summary.json`` records of the combination matrix the run used (``RunContext.weights``: A for
    dif_maml, 11^T/K for centralized, I for noncooperative), so that a figure drawn later shows it and not whatever
    the config's files hold by then. Up to ``RECORD_WEIGHTS_UP_TO`` agents, ``edge_weights``: ``[u, v, A[u, v]]``
    for every pair u < v that combines (a nonzero weight either way), ``[u, v, A[u, v], A[v, u]]`` where the two
    differ (a non-symmetric weight file); ``self_weights``: ``A[k, k]`` per agent. Nothing above that bound."""
    k = weights.shape[0]
    if k > RECORD_WEIGHTS_UP_TO:
        return {}
    pairs = []
    for u in range(k):
        for v in range(u + 1, k):
            a, b = float(weights[u, v]), float(weights[v, u])
            if a > 0 or b > 0:
                pairs.append([u, v, a] if a == b else [u, v, a, b])
    return {"edge_weights": pairs, "self_weights": [float(weights[j, j]) for j in range(k)]}


def write_summary(ctx: RunContext, result: RunResult, named_params, extra: dict) -> dict:
    """The root's closing act: centroid model and ``summary.json`` (both written atomically)."""
    cfg, topo, net = ctx.cfg, ctx.topology, result.network
    if cfg.train.save_models:
        save_tensors_atomic(ctx.run_dir / "models" / "centroid.pt", named_params(net["centroid"]))
    agents = net["agents"]
    summary = {
        "strategy": cfg.strategy.name, "topology": topo.name, "weights": cfg.topology.weights,
        "num_agents": topo.num_agents, "edges": sorted(sorted(e) for e in topo.graph.edges),
        **recorded_weights(ctx.weights),  # the matrix the run combined with, not the config's files as they are now
        "lambda2": mixing_rate(ctx.weights), "topology_lambda2": topo.lambda2,
        **communication(cfg, ctx.schedule),
        "algorithm": cfg.maml.algorithm, "optim": cfg.optim.name, "lr": cfg.optim.lr,
        "iterations": cfg.train.iterations, "seed": cfg.seed,
        "runtime": cfg.runtime.mode, **extra,
        "wall_seconds": result.wall_seconds, "final_eval_seconds": net["final_eval_seconds"],
        "centroid_test_loss": net["centroid_test_loss"], "centroid_test_loss_pre": net["centroid_test_loss_pre"],
        "centroid_adaptation_curve": net["centroid_adaptation_curve"], "disagreement": net["disagreement"],
        **({"rate_disagreement": net["rate_disagreement"]} if "rate_disagreement" in net else {}),
        "mean_final_test_loss": sum(a["final_test_loss"] for a in agents) / len(agents),
        **({"centroid_test_accuracy": net["centroid_test_accuracy"],
            "centroid_test_accuracy_ci95": net["centroid_test_accuracy_ci95"],
            "centroid_accuracy_curve": net["centroid_accuracy_curve"],
            "mean_final_test_accuracy": sum(a["final_test_accuracy"] for a in agents) / len(agents)}
           if "centroid_test_accuracy" in net else {}),
        **({"best_centroid": net["best_centroid"]} if "best_centroid" in net else {}),
        "agents": agents,
        "config": asdict(cfg),
    }
    write_json_atomic(ctx.run_dir / "summary.json", summary)
    log.info("done in %.1f s: centroid test loss %.4f (after %d step), mean agent %.4f, disagreement %.3g; "
             "summary in %s", result.wall_seconds, summary["centroid_test_loss"], cfg.maml.eval_inner_steps,
             summary["mean_final_test_loss"], summary["disagreement"], ctx.run_dir / "summary.json")
    return summary


@contextmanager
def metric_sinks(run_dir: Path, agent_ids: Iterable[int], root: bool, resume_at: int | None = None,
                 tensorboard: bool = False) -> Iterator[tuple[list[MetricsSink], MetricsSink | None]]:
    """Per-agent JSONL sinks (and the root's network sink), each also to TensorBoard with ``tensorboard``.
    ``resume_at``: continue the streams of a resumed run from that iteration — the earlier records are replaced
    only once the resumed run has passed them, and left exactly as they were if it fails."""

    def sink(name: str) -> MetricsSink:
        jsonl = JsonlSink(run_dir / "metrics" / f"{name}.jsonl", resume_at)
        return TeeSink([jsonl, TensorBoardSink(run_dir / "tensorboard" / name)]) if tensorboard else jsonl

    sinks = [sink(f"agent{k}") for k in agent_ids]
    network = sink("network") if root else None
    opened = [s for s in (*sinks, network) if s is not None]
    try:
        yield sinks, network
    except BaseException:
        for sink in opened:
            sink.abandon()
        raise
    for sink in opened:
        sink.close()


def save_models(run_dir: Path, models: dict[int, dict[str, Tensor]]) -> None:
    """``models/agent{k}.pt`` for each local agent k (its parameters by name; each written atomically)."""
    (run_dir / "models").mkdir(exist_ok=True)
    for k, named in models.items():
        save_tensors_atomic(run_dir / "models" / f"agent{k}.pt", named)


def save_best_centroid(run_dir: Path, best: BestCentroid, named: dict[str, Tensor]) -> None:
    """``models/best_centroid.pt`` (its parameters by name) and ``models/best_centroid.json`` (its iteration and
    validation accuracy), each written atomically; the record last, so it never names a model not yet there."""
    (run_dir / "models").mkdir(exist_ok=True)
    save_tensors_atomic(run_dir / "models" / "best_centroid.pt", named)
    write_json_atomic(run_dir / "models" / "best_centroid.json", best.record())


def load_best_centroid(run_dir: Path, layout) -> Optional[BestCentroid]:
    """The best centroid a resumed run had found (None if it had none)."""
    record, model = run_dir / "models" / "best_centroid.json", run_dir / "models" / "best_centroid.pt"
    if not (record.is_file() and model.is_file()):
        return None
    import torch

    info = json.loads(record.read_text())
    named = torch.load(model, map_location="cpu", weights_only=True)
    return BestCentroid(int(info["iteration"]), float(info["val_accuracy"]), layout.flatten(named).detach())


def shared_best_centroid(run_dir: Path, layout, transport, is_root: bool, device, dtype) -> Optional[BestCentroid]:
    """A resumed torchrun run's best centroid so far, as rank 0 reads it from the run directory, on every rank
    (collective: the ranks then make the same decisions from it)."""
    found = load_best_centroid(run_dir, layout) if is_root else None
    best = transport.all_gather_object(found)[0]
    if best is not None:
        best.centroid = best.centroid.to(device, dtype)
    return best
