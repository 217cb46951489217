"""Runs as pictures: ``python -m dif_maml_dist.report RUN_DIR [RUN_DIR ...] --out DIR``.

Writes PNG figures and ``DIR/report.md`` linking them, for one run or several overlaid (each labelled by what
differs in their configs, e.g. ``strategy=centralized`` against ``strategy=dif_maml``):

- ``test_loss.png`` (and ``test_accuracy.png`` for classification): every agent's test figure after adaptation
  (thin) and the centroid's (thick) against the iteration;
- ``disagreement.png``: (1/K) Σ‖w_k − w_c‖² against the iteration;
- ``adaptation.png``: the final loss (accuracy) against the number of adaptation steps, centroid and mean agent;
- ``communication.png``: bytes sent, and compute against exchange seconds, per agent;
- ``topology.png`` (one per distinct graph): the graph with its combination weights, as summary.json recorded
  them (never the config's edge-list file as it is now).

Every input is checked before anything is written: runs of different tasks (their losses are not on one scale),
a run given twice, a run without its ``metrics/`` records, and an ``--out`` that is a file or cannot be written
are each refused in one line with exit status 2. Needs matplotlib (the ``plots`` extra); without it, likewise.

Size: one small function per figure, all reading the same loaded runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from dif_maml_dist.run.files import unwritable
from dif_maml_dist.run.launch import plain
from dif_maml_dist.run.outputs import RECORD_WEIGHTS_UP_TO, RUN_OWN_DIRS

EXIT_USAGE = 2
#: Config fields that differ between runs but say nothing about the experiment (where it ran, where it wrote).
_NOT_LABELS = ("data.root", "data.download", "runtime.threads", "runtime.timeout_s", "runtime.init_timeout_s",
               "runtime.eval_timeout_s", "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
               "train.save_models", "metrics.tensorboard")
#: Above this many agents the graph is drawn without weights (summary.json records them up to there), and above
#: the second not at all.
_LABEL_EDGES_UP_TO, _DRAW_UP_TO = RECORD_WEIGHTS_UP_TO, 400
#: What the figures and the table read from summary.json: checked up front, so no report is left half written.
_SUMMARY_KEYS = ("config", "num_agents", "agents", "iterations", "edges", "strategy", "topology",
                 "centroid_test_loss", "mean_final_test_loss", "disagreement", "wall_seconds",
                 "centroid_adaptation_curve")


class ReportError(ValueError):
    """A run directory that cannot be reported on: one line, exit status 2."""


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return out


class RunData:
    """What a report reads from one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        summary = self.dir / "summary.json"
        if not summary.is_file():
            raise ReportError(f"{self.dir} has no summary.json: it is not a finished run directory")
        try:
            self.summary = json.loads(summary.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{summary} is not valid JSON ({err})") from None
        missing = [k for k in _SUMMARY_KEYS if k not in self.summary]
        if missing:
            raise ReportError(f"{summary} lacks {', '.join(missing)}: it was not written by a finished run")
        self.config = self.summary["config"]
        self.num_agents = int(self.summary["num_agents"])
        self.agents = {k: _records(self.dir / "metrics" / f"agent{k}.jsonl") for k in range(self.num_agents)}
        self.network = _records(self.dir / "metrics" / "network.jsonl")
        if not self.network:
            raise ReportError(f"{self.dir} has no metrics/network.jsonl records: the report draws the run's logged "
                              f"curves; give the run directory with its metrics/ folder")
        self.task = self.config["task"]["name"]
        self.classification = "centroid_test_accuracy" in self.summary
        self.label = self.dir.name

    def series(self, records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        points = [(r["iteration"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def label_runs(runs: Sequence[RunData]) -> None:
    """Each run's label: the config fields whose values differ among the runs (its folder name if none do)."""
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if k not in _NOT_LABELS and len({str(f.get(k)) for f in flat}) > 1]
    for run, f in zip(runs, flat):
        if differ:  # a group's choice reads as on the command line: strategy=centralized, not strategy.name=...
            run.label = ", ".join(f"{k.removesuffix('.name')}={f.get(k)}" for k in differ)
    if len({r.label for r in runs}) < len(runs):  # the same config twice: tell them apart by folder
        for run in runs:
            run.label = f"{run.label} ({run.dir.name})" if differ else run.dir.name


def _check_runs(runs: Sequence[RunData]) -> None:
    seen: dict[Path, RunData] = {}
    for run in runs:
        if seen.setdefault(run.dir.resolve(), run) is not run:
            raise ReportError(f"run directory {run.dir} is given twice; give each run once")
    tasks = {run.task: run for run in runs}
    if len(tasks) > 1:  # a sinusoid's MSE and a classifier's cross-entropy on one axis would compare nothing
        raise ReportError("runs of different tasks cannot share one report (their losses are not comparable): "
                          + ", ".join(f"{run.dir} is {task}" for task, run in tasks.items())
                          + "; report each task separately")


def _check_out(out: Path, run_dirs: Sequence[Path]) -> None:
    resolved = out.resolve()
    for d in map(Path.resolve, run_dirs):
        if resolved == d or (resolved.is_relative_to(d) and resolved.relative_to(d).parts[0] in RUN_OWN_DIRS):
            raise ReportError(f"--out {out} would write among run {d}'s own files; choose another folder "
                              f"(e.g. {d / 'report'})")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give --out a folder (report.md and the figures go there)")
    existing = next(p for p in (out, *out.parents) if p.exists())  # where the first new folder or file goes
    why = unwritable(existing)
    if why:
        raise ReportError(f"cannot write into --out {out}: {existing} {why}; choose a writable folder")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("report needs matplotlib: pip install -e '.[plots]'") from None
    return plt


@contextmanager
def _axes(plt, path: Path, xlabel: str, ylabel: str, log: str = "no") -> Iterator[Any]:
    """One figure's axes, labelled, gridded and saved to ``path`` on the way out. ``log``: ``yes``, ``no``, or
    ``auto`` (log scale where the values span more than a decade)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    low, high = ax.get_ylim()
    if log == "yes" or (log == "auto" and low > 0 and high / low > 10):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _save_with_legend_below(plt, fig, path, *ax.get_legend_handles_labels())


def _save_with_legend_below(plt, fig, path: Path, handles: list, labels: list) -> None:
    # Outside the axes: a legend inside them, wherever matplotlib finds room, still covers curves or bars. The
    # figure's constrained layout makes room for it below the axes.
    fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _over_iterations(plt, runs: Sequence[RunData], agent_key: str, centroid_key: str, ylabel: str, path: Path,
                     log: str = "no") -> None:
    with _axes(plt, path, "iteration", ylabel, log) as ax:
        for i, run in enumerate(runs):
            for records in run.agents.values():
                ax.plot(*run.series(records, agent_key), color=f"C{i}", alpha=0.35, linewidth=0.8)
            ax.plot(*run.series(run.network, centroid_key), color=f"C{i}", linewidth=2.2,
                    label=f"{run.label}: centroid (thin: each agent)")


def _disagreement(plt, runs: Sequence[RunData], path: Path) -> None:
    with _axes(plt, path, "iteration", "disagreement (1/K) Σ‖w_k − w_c‖²", "yes") as ax:
        for i, run in enumerate(runs):
            x, y = run.series(run.network, "disagreement")
            ax.plot(x, [max(v, 1e-30) for v in y], color=f"C{i}", linewidth=1.8, label=run.label)


def _adaptation(plt, runs: Sequence[RunData], path: Path) -> None:
    accuracy = all(r.classification for r in runs)
    with _axes(plt, path, "adaptation steps on the support data",
               "final test accuracy" if accuracy else "final test loss") as ax:
        for i, run in enumerate(runs):
            s = run.summary
            centroid = s["centroid_accuracy_curve"] if accuracy else s["centroid_adaptation_curve"]
            per_agent = [a["accuracy_curve"] if accuracy else a["adaptation_curve"] for a in s["agents"]]
            mean = [sum(c[j] for c in per_agent) / len(per_agent) for j in range(len(per_agent[0]))]
            ax.plot(range(len(centroid)), centroid, color=f"C{i}", marker="o", linewidth=2,
                    label=f"{run.label}: centroid")
            ax.plot(range(len(mean)), mean, color=f"C{i}", linestyle="--", label=f"{run.label}: mean agent")


def _communication(plt, runs: Sequence[RunData], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        agents = run.summary["agents"]
        ks = [a["agent"] + (i - (len(runs) - 1) / 2) * width for a in agents]
        left.bar(ks, [a["bytes_sent"] / 1e6 for a in agents], width=width, color=f"C{i}", label=run.label)
        right.bar(ks, [a["compute_seconds"] for a in agents], width=width, color=f"C{i}")
        right.bar(ks, [a["exchange_seconds"] for a in agents], width=width, bottom=[a["compute_seconds"] for a in agents],
                  color=f"C{i}", alpha=0.45, hatch="//")
    left.set_xlabel("agent")
    left.set_ylabel("MB sent")
    right.set_xlabel("agent")
    right.set_ylabel("seconds (solid: compute, hatched: exchange)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    _save_with_legend_below(plt, fig, path, *left.get_legend_handles_labels())  # one colour per run, both panels


class Drawing(NamedTuple):
    """What ``topology.png`` shows: the agents, the pairs that combine and, if labelled, each pair's weight."""

    num_agents: int
    edges: list[tuple[int, int]]
    labels: Optional[dict[tuple[int, int], str]]


def topology_to_draw(summary: dict[str, Any]) -> Drawing:
    """The graph a run combined over, from its ``summary.json`` alone: never from the config's files, which may
    have changed since. With recorded weights (``edge_weights``, up to ``RECORD_WEIGHTS_UP_TO`` agents), the
    pairs that combine, labelled with their weights; without (more agents, or a summary written before the weights
    were recorded), the pairs the strategy combines over, unlabelled: the recorded ``edges`` (dif_maml), every
    pair (centralized: 11^T/K) or none (noncooperative)."""
    k = summary["num_agents"]
    if "edge_weights" in summary:
        pairs = summary["edge_weights"]
        labels = {(e[0], e[1]): "/".join(f"{w:.3f}" for w in e[2:]) for e in pairs}
        return Drawing(k, [(e[0], e[1]) for e in pairs], labels if k <= _LABEL_EDGES_UP_TO else None)
    if summary["strategy"] == "centralized":
        edges = [(u, v) for u in range(k) for v in range(u + 1, k)]
    elif summary["strategy"] == "noncooperative":
        edges = []
    else:
        edges = [(u, v) for u, v in summary["edges"]]
    return Drawing(k, edges, None)


def _topology(plt, run: RunData, path: Path) -> bool:
    import networkx as nx

    if run.num_agents > _DRAW_UP_TO:
        return False
    drawing = topology_to_draw(run.summary)
    graph = nx.Graph()
    graph.add_nodes_from(range(drawing.num_agents))
    graph.add_edges_from(drawing.edges)
    fig, ax = plt.subplots(figsize=(6, 5))
    pos = nx.spring_layout(graph, seed=0)
    nx.draw_networkx(graph, pos, ax=ax, node_color="#9ecae1", node_size=500 if run.num_agents <= 30 else 60,
                     with_labels=run.num_agents <= 60, font_size=9)
    if drawing.labels is not None:
        nx.draw_networkx_edge_labels(graph, pos, ax=ax, font_size=7, edge_labels=drawing.labels)
    lam = run.summary.get("lambda2")
    ax.set_title(f"{run.summary['topology']} ({run.num_agents} agents), {run.summary['strategy']} weights"
                 + (f", λ₂ = {lam:.4f}" if isinstance(lam, (int, float)) else ""), fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _final_table(runs: Sequence[RunData]) -> list[str]:
    accuracy = all(r.classification for r in runs)
    head = "| run | iterations | centroid test loss | mean agent test loss |" + (
        " centroid accuracy | mean agent accuracy |" if accuracy else "") + " disagreement | MB sent per agent | wall s |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for run in runs:
        s = run.summary
        mb = sum(a["bytes_sent"] for a in s["agents"]) / len(s["agents"]) / 1e6
        row = f"| {run.label} | {s['iterations']} | {s['centroid_test_loss']:.4f} | {s['mean_final_test_loss']:.4f} |"
        if accuracy:
            row += (f" {100 * s['centroid_test_accuracy']:.1f} ± {100 * s['centroid_test_accuracy_ci95']:.1f}% |"
                    f" {100 * s['mean_final_test_accuracy']:.1f}% |")
        row += f" {s['disagreement']:.3g} | {mb:.2f} | {s['wall_seconds']:.0f} |"
        lines.append(row)
    return lines


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Every figure and ``report.md`` for ``run_dirs`` into ``out``; returns the report's path. Every input is
    checked before the first file is written."""
    runs = [RunData(d) for d in run_dirs]
    _check_runs(runs)
    _check_out(out, run_dirs)
    plt = _pyplot()
    label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("Test loss after adaptation", "test_loss.png")]
    _over_iterations(plt, runs, "test_loss_post", "centroid_test_loss_post", "test loss after adaptation",
                     out / "test_loss.png", log="auto")
    if all(r.classification for r in runs):
        _over_iterations(plt, runs, "test_acc_post", "centroid_test_acc_post", "test accuracy after adaptation",
                         out / "test_accuracy.png")
        figures.append(("Test accuracy after adaptation", "test_accuracy.png"))
    _disagreement(plt, runs, out / "disagreement.png")
    _adaptation(plt, runs, out / "adaptation.png")
    _communication(plt, runs, out / "communication.png")
    figures += [("Disagreement", "disagreement.png"), ("Adaptation at the end", "adaptation.png"),
                ("Communication and time per agent", "communication.png")]
    graphs: dict[str, RunData] = {}
    for run in runs:
        graphs.setdefault(json.dumps([run.summary["edges"], run.summary["strategy"], run.summary.get("edge_weights")]),
                          run)
    for i, run in enumerate(graphs.values()):
        name = "topology.png" if len(graphs) == 1 else f"topology_{i}.png"
        if _topology(plt, run, out / name):
            figures.append((f"Topology: {run.label}" if len(graphs) > 1 else "Topology", name))
    lines = ["# Run report", "", *(f"- `{r.dir}`: {r.label}" for r in runs), "", *_final_table(runs), ""]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="dif-maml-report", description=plain(__doc__))
    ap.add_argument("run_dirs", type=Path, nargs="+", help="finished run directories (overlaid in one report)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the figures and report.md")
    args = ap.parse_args(argv)
    try:
        report = write_report(args.run_dirs, args.out)
    except ReportError as err:
        print(f"dif_maml_dist.report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
