"""The training schedule, shared by every way of running agents: one agent per process (torchrun), or all
agents in one process (the simulator). Both drive a :class:`Cohort` — the agents this process owns — through the
same iterations, evaluations, records and final figures, so their outputs have one format.

Size: the schedule is one function read top to bottom (train, log, evaluate, select the best, finish), with the
protocols it drives beside it; split, its order would have to be read across files.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from torch import Tensor

from dif_maml_dist.config import Config
from dif_maml_dist.engine.figures import Curves, centroid_and_disagreement, figures, head

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    """Where the loop writes its records (one dict per evaluation; ``run/sinks.py`` has the files')."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Discards records (agents whose figures nobody reads, e.g. in tests)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ListSink:
    """Keeps records in memory (tests and the in-process runs)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


class Cohort(Protocol):
    """The agents one process drives. Methods marked *collective* must be called by every process together."""

    cfg: Config
    agent_ids: Sequence[int]  #: global ids of the local agents
    is_root: bool  #: this process computes and writes the network-wide figures
    #: the network's figures (centroid, disagreement) are computed during the run, by collectives; False
    #: (runtime.on_peer_failure=continue): each evaluation only scores the local agents and calls ``snapshot``
    networked: bool
    #: how many of a state's entries are the model's parameters (the algorithm's learned inner rates follow them)
    model_size: int

    @property
    def iteration(self) -> int: ...

    def step(self) -> Sequence[Tensor]:
        """One iteration of every local agent; their meta-training losses."""

    def counters(self, i: int) -> dict[str, float]:
        """``compute_s``, ``exchange_s``, ``bytes_sent`` of local agent ``i`` (cumulative)."""

    def agent_curves(self, max_steps: int, final: bool = False) -> list[Curves]:
        """Each local agent's per-task test curves after 0..max_steps adaptation steps, on the periodic test set
        or (``final``) the final one."""

    def all_states(self) -> Tensor:
        """*Collective*: every agent's flat parameters ``[K, P]``, on every process."""

    def gather(self, items: list[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
        """*Collective*: the local agents' ``items`` from every process, by agent id, on the root."""

    def shared_curves(self, params: Tensor, max_steps: int, final: bool = False, validation: bool = False) -> Curves:
        """*Collective*: the same curves for parameters every process holds (the centroid), on every process; the
        work may be shared among processes (each adapting a slice of the test tasks). ``validation``: on the
        validation tasks instead (train.validate)."""

    def union(self, ids: list[int]) -> list[int]:
        """*Collective*: the union of every process's ``ids``, on every process."""

    def nonfinite(self) -> list[int]:
        """Ids of the local agents whose parameters hold a NaN or an infinity."""

    def snapshot(self) -> None:
        """Keep the local agents' parameters of this evaluation for the network's figures (``networked=False``)."""


class Checkpointer(Protocol):
    """Writes the local agents' loop states every ``every`` iterations and at the last (see ``run/checkpoint.py``)."""

    every: int  #: 0: never, not even at the last iteration
    last: Optional[int]  #: iteration of the newest checkpoint written or resumed from
    where: str  #: where the checkpoints are, for messages

    def save(self, iteration: int) -> None: ...


@dataclass
class RunResult:
    """What a process knows at the end of a run (the root also holds the network-wide figures)."""

    agents: list[dict[str, Any]]  #: final figures of the local agents
    network: Optional[dict[str, Any]] = None  #: root only: all agents, centroid, disagreement
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  #: root only: the network records


@dataclass
class Evaluation:
    """One evaluation of the network: the local agents' curves, and (root only) the centroid's."""

    agents: list[Curves]
    centroid: Optional[Tensor]  #: None when the cohort is not networked
    disagreement: Optional[float]  #: of the model's parameters
    centroid_curves: Optional[Curves]  #: on every process
    rate_disagreement: Optional[float] = None  #: of the learned inner rates, if the algorithm learns them

    def head(self, tasks: int, steps: int) -> "Evaluation":
        """The same evaluation restricted to the first ``tasks`` test tasks and 0..``steps`` steps."""
        return Evaluation([head(c, tasks, steps) for c in self.agents], self.centroid, self.disagreement,
                          None if self.centroid_curves is None else head(self.centroid_curves, tasks, steps),
                          self.rate_disagreement)


@dataclass
class BestCentroid:
    """The centroid with the highest validation accuracy so far (train.validate), the same on every process."""

    iteration: int
    val_accuracy: float
    centroid: Tensor

    def record(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "val_accuracy": self.val_accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {**self.record(), "centroid": self.centroid.detach().clone()}

    @classmethod
    def from_state_dict(cls, sd: Optional[dict[str, Any]]) -> Optional["BestCentroid"]:
        return None if sd is None else cls(int(sd["iteration"]), float(sd["val_accuracy"]), sd["centroid"])


def _evaluate(cohort: Cohort, max_steps: int, final: bool = False) -> Evaluation:
    """*Collective*. Every process computes the same centroid from the same gathered states, so each can adapt
    its share of the test tasks; every process gets the centroid's curves."""
    agents = cohort.agent_curves(max_steps, final)
    if not cohort.networked:
        return Evaluation(agents, None, None, None)
    centroid, disagreement, rates = centroid_and_disagreement(cohort.all_states(), cohort.model_size)
    return Evaluation(agents, centroid, disagreement, cohort.shared_curves(centroid, max_steps, final), rates)


def _rate_disagreement(ev: Evaluation) -> dict[str, float]:
    return {} if ev.rate_disagreement is None else {"rate_disagreement": ev.rate_disagreement}


def _pre_post(stats: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """``{prefix}loss_pre/post`` (and ``acc``) from an evaluation: before and after the last adaptation step."""
    out = {f"{prefix}loss_pre": stats["loss"][0], f"{prefix}loss_post": stats["loss"][-1]}
    if "accuracy" in stats:
        out[f"{prefix}acc_pre"], out[f"{prefix}acc_post"] = stats["accuracy"][0], stats["accuracy"][-1]
    return out


def final_figures(stats: dict[str, list[float]], steps: int, last: int, prefix: str,
                  curve_prefix: str) -> dict[str, Any]:
    """Final figures after ``steps`` adaptation steps (``{prefix}test_loss`` ...), and the curves over 0..last
    steps (``{curve_prefix}adaptation_curve`` ...)."""
    out = {f"{prefix}test_loss": stats["loss"][steps], f"{prefix}test_loss_pre": stats["loss"][0],
           f"{curve_prefix}adaptation_curve": stats["loss"][:last + 1]}
    if "accuracy" in stats:
        out.update({f"{prefix}test_accuracy": stats["accuracy"][steps],
                    f"{prefix}test_accuracy_ci95": stats["accuracy_ci95"][steps],
                    f"{prefix}test_accuracy_pre": stats["accuracy"][0],
                    f"{curve_prefix}accuracy_curve": stats["accuracy"][:last + 1]})
    return out


def run_loop(cohort: Cohort, sinks: Sequence[MetricsSink] | None = None, network_sink: MetricsSink | None = None,
             progress: bool = False, checkpointer: Checkpointer | None = None,
             best: Optional[BestCentroid] = None,
             on_best: Optional[Callable[[BestCentroid], None]] = None) -> RunResult:
    """Train from ``cohort.iteration`` (0, or where a checkpoint left off) to ``cfg.train.iterations``; evaluate at
    the start, every ``eval_every`` and at the end; log every ``log_every``; checkpoint every
    ``checkpointer.every`` and at the end. ``sinks[i]`` receives local agent ``i``'s records, ``network_sink`` the
    root's network records. With ``train.validate``: ``best`` is the best centroid so far (of the run being
    resumed, the same on every process), and ``on_best`` (the root's) is called with each new best."""
    cfg = cohort.cfg
    tr, m = cfg.train, cfg.maml
    local = range(len(cohort.agent_ids))
    sinks = list(sinks) if sinks is not None else [NullSink() for _ in local]
    network_sink = network_sink or NullSink()
    history: list[dict[str, Any]] = []
    state: dict[str, Optional[BestCentroid]] = {"best": best}
    start = time.perf_counter()
    last = {"it": cohort.iteration, "t": start}

    def evaluate(records: list[dict[str, Any]], ev: Optional[Evaluation] = None,
                 reached: Optional[float] = None) -> None:
        """The periodic figures into ``records`` (and the root's network record), from ``ev`` if given;
        ``reached``: when training reached this iteration (the logged rate leaves out a final evaluation)."""
        ev = ev or _evaluate(cohort, m.eval_inner_steps)
        stats = [figures(c) for c in ev.agents]
        for rec, st in zip(records, stats):
            rec.update(_pre_post(st, "test_"))
        if not cohort.networked:
            cohort.snapshot()
            if progress:
                log.info("iter %d/%d | agent%d test %.4f -> %.4f", cohort.iteration, tr.iterations,
                         cohort.agent_ids[0], stats[0]["loss"][0], stats[0]["loss"][-1])
            return
        validation = {}
        if tr.validate:  # every process sees the same figures, so all agree on the best centroid
            validation = _pre_post(figures(cohort.shared_curves(ev.centroid, m.eval_inner_steps, validation=True)),
                                   "centroid_val_")
            if state["best"] is None or validation["centroid_val_acc_post"] > state["best"].val_accuracy:
                state["best"] = BestCentroid(cohort.iteration, validation["centroid_val_acc_post"],
                                             ev.centroid.detach().clone())
                if cohort.is_root and on_best is not None:
                    on_best(state["best"])
        if not cohort.is_root:
            return
        centroid_stats = figures(ev.centroid_curves)
        nrec = {"iteration": cohort.iteration, **_pre_post(centroid_stats, "centroid_test_"), **validation,
                "disagreement": ev.disagreement, **_rate_disagreement(ev), "wall_s": time.perf_counter() - start}
        network_sink.write(nrec)
        history.append(nrec)
        if progress:
            now = time.perf_counter()
            rate = (cohort.iteration - last["it"]) / max((reached or now) - last["t"], 1e-9)
            train = records[0].get("meta_train_loss")
            acc = f" | centroid acc {nrec['centroid_test_acc_post']:.3f}" if "centroid_test_acc_post" in nrec else ""
            log.info("iter %d/%d | train %s | agent%d test %.4f -> %.4f | centroid %.4f%s | disagreement %.3g | "
                     "%.3g it/s", cohort.iteration, tr.iterations, "-" if train is None else f"{train:.4f}",
                     cohort.agent_ids[0], stats[0]["loss"][0], stats[0]["loss"][-1], centroid_stats["loss"][-1], acc,
                     ev.disagreement, rate)
            last["it"], last["t"] = cohort.iteration, now

    resumed = {"resumed": True} if cohort.iteration > 0 else {}
    first = [{"iteration": cohort.iteration, **resumed, "bytes_sent": cohort.counters(i)["bytes_sent"]}
             for i in local]
    evaluate(first)
    for sink, rec in zip(sinks, first):
        sink.write(rec)

    def timed_final_evaluation() -> tuple[Evaluation, float]:
        """Loss vs number of adaptation steps on the final test set, per agent and for the centroid."""
        t0 = time.perf_counter()
        ev = _evaluate(cohort, max(m.final_adapt_steps, m.eval_inner_steps), final=True)
        return ev, time.perf_counter() - t0

    final: Optional[Evaluation] = None
    final_seconds = 0.0
    every = checkpointer.every if checkpointer is not None else 0
    window: list[Any] = [0.0 for _ in local]
    window_n = 0
    while cohort.iteration < tr.iterations:
        losses = cohort.step()
        window = [w + loss for w, loss in zip(window, losses)]
        window_n += 1
        it = cohort.iteration
        is_eval = it % tr.eval_every == 0 or it == tr.iterations
        is_log = is_eval or it % tr.log_every == 0
        # Also at the last iteration, so that every finished run can be extended (train.resume=true with more
        # iterations), however short it was.
        is_checkpoint = every > 0 and (it % every == 0 or it == tr.iterations)
        if not (is_log or is_checkpoint):
            continue
        means = [float(window[i]) / window_n for i in local]
        # Decided together: a NaN reaches distant agents only hop by hop, so an agent that stopped alone
        # would leave its neighbours waiting in the next exchange until the timeout. Checked before a checkpoint
        # is written, so the newest checkpoint is always a good one.
        nonfinite = set(cohort.nonfinite())
        diverged = cohort.union([cohort.agent_ids[i] for i in local
                                 if not math.isfinite(means[i]) or cohort.agent_ids[i] in nonfinite])
        if diverged:
            last = (f"the last good checkpoint is iteration {checkpointer.last} ({checkpointer.where}); "
                    if checkpointer is not None and checkpointer.last is not None else "")
            hint = "optim.lr or maml.inner_lr" + (" (or compression.gamma)" if cfg.compression.name != "none" else "")
            raise FloatingPointError(f"agents {diverged}: non-finite meta-training loss or parameters by iteration "
                                     f"{it}; {last}lower {hint}")
        if is_checkpoint:
            checkpointer.save(it)
        if not is_log:
            continue
        records = [{"iteration": it, "meta_train_loss": means[i], **cohort.counters(i),
                    "wall_s": time.perf_counter() - start} for i in local]
        window, window_n = [0.0 for _ in local], 0
        if it == tr.iterations:
            # The periodic test set is the final one's prefix, and the final curves run past the periodic steps:
            # the last periodic record is read off the final evaluation instead of adapting the same tasks twice.
            reached = time.perf_counter()
            final, final_seconds = timed_final_evaluation()
            evaluate(records, final.head(cfg.task.eval_tasks, m.eval_inner_steps), reached)
        elif is_eval:
            evaluate(records)
        for sink, rec in zip(sinks, records):
            sink.write(rec)
    if final is None:  # resumed from a checkpoint of the last iteration: nothing was trained
        final, final_seconds = timed_final_evaluation()

    # Final figures: loss vs number of adaptation steps, per agent and for the centroid.
    mine = []
    for i, curves in zip(local, final.agents):
        c = cohort.counters(i)
        mine.append({"agent": cohort.agent_ids[i],
                     **final_figures(figures(curves), m.eval_inner_steps, m.final_adapt_steps, "final_", ""),
                     "bytes_sent": c["bytes_sent"], "compute_seconds": c["compute_s"],
                     "exchange_seconds": c["exchange_s"]})
    best_figures = None
    if state["best"] is not None:  # the selected model's test figures, on the final test set like the final model's
        b = state["best"]
        curves = cohort.shared_curves(b.centroid, max(m.final_adapt_steps, m.eval_inner_steps), final=True)
        best_figures = {**b.record(), **final_figures(figures(curves), m.eval_inner_steps, m.final_adapt_steps, "", "")}
    everyone = cohort.gather(mine)
    network = None
    if cohort.is_root:
        assert everyone is not None
        network = {"agents": everyone, "centroid": final.centroid, "disagreement": final.disagreement,
                   **_rate_disagreement(final),
                   **final_figures(figures(final.centroid_curves), m.eval_inner_steps, m.final_adapt_steps,
                                   "centroid_", "centroid_"),
                   "final_eval_seconds": final_seconds,
                   **({"best_centroid": best_figures} if best_figures is not None else {})}
    return RunResult(mine, network, time.perf_counter() - start, history)
