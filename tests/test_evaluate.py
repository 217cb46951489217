"""After training: dif_maml_dist.evaluate (command line and Python API) and dif_maml_dist.report on short real
runs."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dif_maml_dist import load_run
from dif_maml_dist.evaluate import main as evaluate_main
from dif_maml_dist.learning.adaptation import adaptation_curves_loop
from tests.helpers import REPO, read_only


def _sinusoid_run(path, *overrides):
    """A finished 6-agent sinusoid run (the simulator: the same outputs as a torchrun job, in seconds)."""
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.threads=1",
                           "train.iterations=40", "train.eval_every=20", "task.eval_tasks=60",
                           "maml.final_adapt_steps=4", *overrides, f"hydra.run.dir={path}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _sinusoid_run(tmp_path_factory.mktemp("evaluate") / "run")


def test_evaluate_reproduces_the_runs_own_final_figures(run_dir, capsys):
    """``evaluate RUN --model all`` on the run's own test set and steps gives the centroid's and every agent's
    final adaptation curves as summary.json has them. Catches a model file loaded into the wrong parameter
    order, another test set than the run's, or adaptation with another step size."""
    assert evaluate_main([str(run_dir), "--model", "all"]) == 0
    printed = capsys.readouterr().out
    assert "centroid" in printed and "agent5" in printed
    result = json.loads((run_dir / "evaluation.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["tasks"] == 60 and result["steps"] == 4
    np.testing.assert_allclose(result["models"]["centroid"]["loss"], summary["centroid_adaptation_curve"],
                               rtol=1e-5)
    for agent in summary["agents"]:
        np.testing.assert_allclose(result["models"][f"agent{agent['agent']}"]["loss"], agent["adaptation_curve"],
                                   rtol=1e-5)
    # Another seed draws other test tasks: other figures.
    assert evaluate_main([str(run_dir), "--seed", "7", "--tasks", "30", "--json", str(run_dir / "other.json")]) == 0
    other = json.loads((run_dir / "other.json").read_text())
    assert other["tasks"] == 30 and other["models"]["centroid"]["loss"][0] != result["models"]["centroid"]["loss"][0]


def test_api_adapt_equals_the_training_codes_adaptation_and_a_written_out_sgd_loop(run_dir):
    """``load_run(DIR).model("agent2").adapt(x, y, steps)`` gives the same query loss as the evaluation's
    adaptation curve at that step, and the same parameters as plain SGD written out on the module itself
    (torch.func.functional_call, autograd). Catches an adapt that uses another step size, steps or forward."""
    run = load_run(run_dir)
    model = run.model("agent2")
    learner = model.learner
    batch = learner.tests.slice(0, 1)
    xs, ys, xq, yq = (t[0] for t in batch.tensors())
    curve, _ = adaptation_curves_loop(learner.model.first_order_forward, F.mse_loss, learner.algorithm.inner,
                                      model.params, batch, 3)
    adapted = model.adapt(xs, ys, steps=3)
    assert torch.allclose(F.mse_loss(adapted(xq), yq), curve[0, 3], rtol=1e-6)
    module = learner.family.build_model()
    w = dict(zip(learner.layout.names, (p.clone() for p in model.params)))
    for _ in range(3):
        w = {k: v.requires_grad_(True) for k, v in w.items()}
        loss = F.mse_loss(torch.func.functional_call(module, w, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(w.values()))
        w = {k: (v - run.cfg.maml.inner_lr * g).detach() for (k, v), g in zip(w.items(), grads)}
    for name, p in adapted.named_parameters().items():
        torch.testing.assert_close(p, w[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.adapt(xs, ys, steps=0).params[0], model.params[0])  # zero steps: the launch model


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "holds no run"),
    (["{run}", "--model", "agent9"], "has no model 'agent9'; it has: centroid, agent0,"),
    (["{run}", "--json", "{run}/summary.json"], "would overwrite the run's own files"),
    (["{run}", "--json", "{run}/models/x.json"], "would overwrite the run's own files"),
    (["{run}", "--tasks", "0"], "--tasks must be at least 1"),
    (["{file}"], "is a file, not a run directory"),
    (["{run}", "--json", "{missing}/x.json"], "does not exist; give --json a file in a writable folder"),
    (["{run}", "--json", "{file}/x.json"], "is not a folder; give --json a file in a writable folder"),
    pytest.param(["{run}", "--json", "/proc/x.json"], "/proc cannot be written",  # refused to root as well
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no Linux /proc")),
    (["{run}", "--device", "gpu"], "--device gpu is not a device torch knows; use cpu or cuda"),
    (["{run}", "--device", "meta"], "--device meta cannot evaluate; use cpu or cuda"),
    (["{run}", "--tasks", "2000000000"], "--tasks must be at most 100000"),
    (["{run}", "--steps", "100000"], "--steps must be at most 1000"),
    (["{run}", "--seed", "-1"], "--seed must be a non-negative integer, got -1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    """Each mistake ends in one line naming it, exit status 2, no file written and nothing evaluated (no table
    printed). Catches tracebacks for an unknown or unusable device, a run path that is a file reported as missing,
    a negative seed reported as a task-family failure, task or step counts without a bound (memory, hours), and
    an output folder that is only found missing after the evaluation, losing it."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a run")
    args = [a.format(run=run_dir, missing=tmp_path / "nope", empty=tmp_path / "empty", file=tmp_path / "file.txt")
            for a in args]
    before = sorted(p for p in run_dir.rglob("*"))
    assert evaluate_main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("dif_maml_dist.evaluate: error: ") and message in err and "\n" not in err, err
    assert captured.out == ""
    assert sorted(p for p in run_dir.rglob("*")) == before
    assert not (tmp_path / "nope").exists()


def test_default_output_in_a_read_only_run_folder_is_refused_before_evaluating(run_dir, tmp_path, capsys):
    """A run folder that cannot be written (a shared, read-only copy) and no --json: one line naming the file and
    --json, exit status 2, before any evaluation. Catches the table printed and the figures then lost in a
    traceback when the default RUN/evaluation.json cannot be written."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("evaluation.json", "other.json"))
    with read_only(copy):
        assert evaluate_main([str(copy)]) == 2
    captured = capsys.readouterr()
    assert "cannot write" in captured.err and "--json" in captured.err and captured.out == "", captured
    assert not (copy / "evaluation.json").exists()


def test_a_run_without_models_is_refused(tmp_path, capsys):
    """A run directory whose models are missing (unfinished, or train.save_models=false) says so."""
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    from dif_maml_dist.config import Config

    OmegaConf.save(OmegaConf.structured(Config), tmp_path / "run" / ".hydra" / "config.yaml")
    assert evaluate_main([str(tmp_path / "run")]) == 2
    assert "has no saved models (models/*.pt)" in capsys.readouterr().err


def _write_sinusoid_episode(path, batch):
    xs, ys, xq, yq = (t[0, :, 0].tolist() for t in batch.tensors())
    lines = ["split,x,y"] + [f"support,{x!r},{y!r}" for x, y in zip(xs, ys)] + \
        [f"query,{x!r},{y!r}" for x, y in zip(xq, yq)]
    path.write_text("\n".join(lines) + "\n")


def test_sinusoid_episodes_from_csv_give_the_figures_of_the_same_tasks_sampled_internally(run_dir, tmp_path):
    """The run's first 5 test tasks written as ``<episode>.csv`` files (split,x,y) evaluate to the figures of
    ``--tasks 5`` on the test split. Catches support and query swapped, or columns read in the wrong order."""
    run = load_run(run_dir)
    tests = run.learner().tests
    for t in range(5):
        _write_sinusoid_episode(tmp_path / f"task{t}.csv", tests.slice(t, t + 1))
    mine = run.evaluate(["centroid"], steps=3, episodes=tmp_path)
    internal = run.evaluate(["centroid"], steps=3, tasks=5)
    assert mine["tasks"] == 5 and mine["episode_names"] == [f"task{t}" for t in range(5)]
    np.testing.assert_allclose(mine["models"]["centroid"]["loss"], internal["models"]["centroid"]["loss"],
                               rtol=1e-5)


def test_sinusoid_csv_with_a_utf8_bom_reads_as_without(run_dir, tmp_path):
    """An episode CSV saved with a UTF-8 byte-order mark (as spreadsheet programs save "CSV UTF-8") evaluates to
    the figures of the same file without it. Catches the header read as ['\\ufeffsplit', 'x', 'y'] and refused."""
    run = load_run(run_dir)
    plain, marked = tmp_path / "plain", tmp_path / "bom"
    plain.mkdir()
    marked.mkdir()
    _write_sinusoid_episode(plain / "task.csv", run.learner().tests.slice(0, 1))
    (marked / "task.csv").write_bytes(b"\xef\xbb\xbf" + (plain / "task.csv").read_bytes())
    assert (run.evaluate(["centroid"], steps=1, episodes=marked)["models"]
            == run.evaluate(["centroid"], steps=1, episodes=plain)["models"])


@pytest.mark.parametrize("value", ["nan", "1e400", "-inf"])
def test_sinusoid_csv_with_a_non_finite_number_is_refused(run_dir, tmp_path, capsys, value):
    """A CSV episode whose y is nan or overflows to infinity stops with one line naming the file and line, exit
    status 2, nothing written. Catches non-finite points accepted and turned into nan/inf figures."""
    (tmp_path / "ep").mkdir()
    (tmp_path / "ep" / "a.csv").write_text(f"split,x,y\nsupport,0.5,1.0\nquery,0.5,{value}\n")
    assert evaluate_main([str(run_dir), "--episodes", str(tmp_path / "ep"), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"a.csv:3: x and y must be finite numbers, got '0.5', '{value}'" in err and "\n" not in err, err
    assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory):
    """A short Omniglot run on a generated fixture in the real folder layout (5 test characters)."""
    from tests.test_omniglot import make_fixture

    base = tmp_path_factory.mktemp("omniglot")
    make_fixture(base / "data", {"images_background": {"Alpha": 6, "Beta": 6}, "images_evaluation": {"Gamma": 6}})
    run = base / "run"
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.threads=1",
                           "task=omniglot_5w1s", f"data.root={base / 'data'}", "topology=ring",
                           "topology.num_agents=2", "model.filters=4", "task.meta_batch=2", "task.q_query=2",
                           "train.iterations=6", "train.eval_every=3", "task.eval_tasks=4",
                           "task.final_eval_tasks=6", "maml.final_adapt_steps=2", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, base / "data"


def test_omniglot_episodes_folder_gives_the_accuracy_of_the_same_episodes_sampled_internally(omniglot_run, tmp_path):
    """The run's first 4 test episodes, written out as folders of the original PNG drawings
    (``<episode>/support|query/<class>/<image>``, classes named in label order), evaluate through
    ``evaluate --episodes`` to the loss and accuracy of the same episodes sampled internally. Catches images
    converted differently from the dataset's (size, ink polarity, scaling) and labels assigned in another
    order than the folders'."""
    from dif_maml_dist.tasks.omniglot import character_folders

    run_dir, data = omniglot_run
    run = load_run(run_dir)
    picks = run.learner().tests.picks[:4]  # [tasks, way, shot + query, (class, image, turns)]
    folders = [f for _, f in character_folders(data)]
    shots = run.cfg.task.k_shot
    for t, episode in enumerate(picks.tolist()):
        for w, images in enumerate(episode):
            for i, (c, d, _) in enumerate(images):
                dest = tmp_path / f"ep{t}" / ("support" if i < shots else "query") / f"{w:02d}_{folders[c].name}"
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{i}.png").write_bytes(sorted(folders[c].glob("*.png"))[d].read_bytes())
    assert evaluate_main([str(run_dir), "--model", "all", "--episodes", str(tmp_path / "."), "--steps", "2",
                          "--json", str(tmp_path / "mine.json")]) == 0
    mine = json.loads((tmp_path / "mine.json").read_text())
    internal = run.evaluate(run.model_names, steps=2, tasks=4)
    for name in run.model_names:
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(mine["models"][name][key], internal["models"][name][key], rtol=1e-5)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (PIL judges the size on opening, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def _episode(root, support, query, image):
    for split, classes in (("support", support), ("query", query)):
        for c in classes:
            (root / "e0" / split / c).mkdir(parents=True, exist_ok=True)
            if image is not None:
                (root / "e0" / split / c / "a.png").write_bytes(image)


@pytest.mark.parametrize("case, message", [
    ("three_classes", "has 3 support classes but the model has 5 outputs"),
    ("empty_class", "is empty: give it at least one image"),
    ("unreadable", "cannot read image"),
    ("query_only_class", "query class 'z' has no support folder"),
    ("empty_query", "has no query images: give query/<class>/ folders"),
    ("bomb", "over PIL's decompression-bomb limit"),
])
def test_bad_episodes_are_one_line_exit_2(omniglot_run, tmp_path, capsys, case, message):
    """A wrong class count for the model's head, an empty class folder, an unreadable image, a query class
    absent from the support, an episode without query images and an image too large to decode safely each stop
    with one line naming the folder or file, exit status 2. Catches the tracebacks of the last two (torch.stack
    of nothing; PIL's DecompressionBombError)."""
    run_dir, data = omniglot_run
    png = next((data / "omniglot-py").rglob("*.png")).read_bytes()
    five = ["a", "b", "c", "d", "e"]
    if case == "three_classes":
        _episode(tmp_path, five[:3], five[:3], png)
    elif case == "empty_class":
        _episode(tmp_path, five, five, png)
        (tmp_path / "e0" / "query" / "f").mkdir()
    elif case == "unreadable":
        _episode(tmp_path, five, five, b"not an image")
    elif case == "query_only_class":
        _episode(tmp_path, five, five + ["z"], png)
    elif case == "empty_query":
        _episode(tmp_path, five, [], png)
        (tmp_path / "e0" / "query").mkdir()
    else:
        _episode(tmp_path, five, five, png)
        (tmp_path / "e0" / "query" / "a" / "a.png").write_bytes(_png_claiming(30_000, 30_000))
    assert evaluate_main([str(run_dir), "--episodes", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "x.json").exists()


def test_one_episode_writes_valid_json_and_prints_no_interval(omniglot_run, tmp_path, capsys, recwarn):
    """A single episode has no spread over tasks: its accuracy's 95% half-width is null in the JSON (which must
    stay valid JSON) and the table prints no interval, nor a warning about it. Catches '± nan%' printed, a bare
    NaN written and torch's std() warning shown."""
    run_dir, data = omniglot_run
    png = next((data / "omniglot-py").rglob("*.png")).read_bytes()
    _episode(tmp_path, "abcde", "abcde", png)
    assert evaluate_main([str(run_dir), "--episodes", str(tmp_path), "--steps", "1",
                          "--json", str(tmp_path / "x.json")]) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and "±" not in printed, printed
    assert not [w for w in recwarn if "std()" in str(w.message)]

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    result = json.loads((tmp_path / "x.json").read_text(), parse_constant=no_constants)
    assert result["models"]["centroid"]["accuracy_ci95"] == [None, None]
    assert len(result["models"]["centroid"]["accuracy"]) == 2


def test_report_overlays_two_runs_in_every_figure_labelled_by_what_differs(run_dir, tmp_path):
    """``report RUN_A RUN_B --out DIR`` on a dif_maml and a centralized run writes every figure (non-trivial
    PNGs) and a report.md that links each one and labels the runs by the config field that differs. Catches a
    figure silently skipped, a broken link, and labels that do not tell the runs apart."""
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[dev]')")
    from dif_maml_dist.report import main as report_main

    other = _sinusoid_run(tmp_path / "centralized", "strategy=centralized")
    out = tmp_path / "report"
    assert report_main([str(run_dir), str(other), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for name in ("test_loss.png", "disagreement.png", "adaptation.png", "communication.png", "topology_0.png",
                 "topology_1.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f"]({name})" in text, name
    assert "strategy=dif_maml" in text and "strategy=centralized" in text
    assert report_main([str(run_dir), "--out", str(run_dir / "metrics")]) == 2  # never among a run's own files
    assert report_main([str(tmp_path), "--out", str(tmp_path / "r2")]) == 2  # not a run directory
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("case, message", [
    ("out_is_a_file", "is a file; give --out a folder"),
    ("no_metrics", "has no metrics/network.jsonl"),
    ("different_tasks", "runs of different tasks cannot share one report"),
    ("twice", "is given twice; give each run once"),
    ("read_only_out", "cannot write into --out"),
    pytest.param("proc_out", "cannot write into --out /proc/report: /proc cannot be written",  # root too
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no Linux /proc")),
])
def test_report_refuses_bad_input_in_one_line_and_writes_nothing(run_dir, tmp_path, capsys, request, case,
                                                                 message):
    """``report`` with --out an existing file or a folder it cannot write, a run without its metrics/ folder, a
    sinusoid and an Omniglot run together (losses of different scales on one axis), or one run given twice: one
    line, exit status 2, nothing written. Catches the tracebacks of the --out cases and of the run without
    metrics/ (raised after test_loss.png was already written), and mixed or identically labelled runs drawn
    without complaint."""
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[dev]')")
    from dif_maml_dist.report import main as report_main

    out, runs = tmp_path / "report", [run_dir]
    if case == "out_is_a_file":
        out.write_text("keep me")
    elif case == "no_metrics":
        runs = [tmp_path / "run"]
        shutil.copytree(run_dir, runs[0], ignore=shutil.ignore_patterns("metrics"))
    elif case == "different_tasks":
        runs = [run_dir, request.getfixturevalue("omniglot_run")[0]]
    elif case == "twice":
        runs = [run_dir, run_dir]
    elif case == "proc_out":
        out = Path("/proc/report")
    else:
        out.mkdir()
    with read_only(out) if case == "read_only_out" else contextlib.nullcontext():
        assert report_main([*map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dif_maml_dist.report: error: ") and message in err and "\n" not in err, err
    if case == "out_is_a_file":
        assert out.read_text() == "keep me"
    elif case == "read_only_out":
        assert not any(out.iterdir())
    else:
        assert not out.exists()


@pytest.mark.parametrize("tool", ["evaluate", "report"])
def test_help_is_plain_text(tool, capsys):
    """``--help`` of both tools reads as plain text. Catches reStructuredText markup (``like this``) copied from
    the module docstrings into the help."""
    module = importlib.import_module(f"dif_maml_dist.{tool}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ") and "``" not in printed, printed


def test_report_legends_never_cover_data(run_dir, tmp_path, monkeypatch):
    """In every figure of a report each legend lies outside every axes (where the curves and bars are) and inside
    the saved figure. Catches legends placed over the data, as communication.png's covered its bars."""
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[dev]')")
    from matplotlib.figure import Figure

    from dif_maml_dist.report import main as report_main

    save, legends_checked = Figure.savefig, {}

    def checked_save(fig, path, *args, **kwargs):
        fig.canvas.draw()  # the layout places the legends at draw time
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), f"{path}: the legend covers the axes"
            inside = fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
            assert inside, f"{path}: the legend is cut off"
        legends_checked[Path(path).name] = len(legends)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    assert report_main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert all(legends_checked[name] == 1 for name in ("test_loss.png", "disagreement.png", "adaptation.png",
                                                       "communication.png")), legends_checked


_PATH_GRAPH, _OTHER_GRAPH = "0 1\n1 2\n2 3\n", "0 1\n0 2\n0 3\n1 2\n"


@pytest.fixture(scope="module")
def edge_list_run(tmp_path_factory):
    """A finished 4-agent run on a path read from an edge-list file, with the combination matrix it used."""
    from dif_maml_dist.config import TopologyConfig
    from dif_maml_dist.graphs.topology import build_topology

    folder = tmp_path_factory.mktemp("edge_list")
    graph_file = folder / "graph.txt"
    graph_file.write_text(_PATH_GRAPH)
    used = build_topology(TopologyConfig(name="edge_list", edge_list=str(graph_file))).weights
    run = _sinusoid_run(folder / "run", "topology=edge_list", f"topology.edge_list={graph_file}")
    return run, graph_file, used


def _capture_topology_drawing(monkeypatch) -> dict:
    """What the report hands networkx for topology.png: the graph's edges and the edge labels, if any."""
    import networkx as nx

    drawn, draw, label = {}, nx.draw_networkx, nx.draw_networkx_edge_labels

    def draw_graph(graph, *args, **kwargs):
        drawn["nodes"] = set(graph.nodes)
        drawn["edges"] = {tuple(sorted(e)) for e in graph.edges}
        return draw(graph, *args, **kwargs)

    def draw_labels(graph, *args, edge_labels=None, **kwargs):
        drawn["labels"] = {tuple(sorted(e)): text for e, text in (edge_labels or {}).items()}
        return label(graph, *args, edge_labels=edge_labels, **kwargs)

    monkeypatch.setattr(nx, "draw_networkx", draw_graph)
    monkeypatch.setattr(nx, "draw_networkx_edge_labels", draw_labels)
    return drawn


def test_report_draws_the_graph_and_weights_the_run_used_not_the_edge_list_file_as_it_is_now(
        edge_list_run, tmp_path, monkeypatch):
    """A run on ``topology=edge_list`` whose edge-list file is rewritten with another graph afterwards: summary.json
    holds the weights of the matrix the run combined with (``edge_weights``, ``self_weights``), and topology.png
    draws those edges labelled with those weights. Catches the report rebuilding the topology from the config's
    file as it is now (the new graph and its weights drawn under the run's own lambda_2), and a summary that
    records the edges but not the weights."""
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[dev]')")
    from dif_maml_dist.report import main as report_main

    run, graph_file, used = edge_list_run
    graph_file.write_text(_OTHER_GRAPH)  # edited after the run
    path_edges = [(0, 1), (1, 2), (2, 3)]
    drawn = _capture_topology_drawing(monkeypatch)
    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    assert (out / "topology.png").stat().st_size > 10_000
    assert drawn["nodes"] == {0, 1, 2, 3} and drawn["edges"] == set(path_edges), drawn
    assert drawn["labels"] == {(u, v): f"{used[u, v]:.3f}" for u, v in path_edges}, drawn
    summary = json.loads((run / "summary.json").read_text())
    assert summary["edges"] == [list(e) for e in path_edges]
    assert summary["edge_weights"] == [[u, v, float(used[u, v])] for u, v in path_edges]
    assert summary["self_weights"] == [float(used[k, k]) for k in range(4)]


def test_report_draws_a_summary_written_before_weights_were_recorded_unlabelled(edge_list_run, tmp_path,
                                                                                monkeypatch):
    """A summary.json without ``edge_weights`` (written before runs recorded them), its edge-list file since
    rewritten: the report still writes topology.png, drawing the recorded edges without weight labels. Catches a
    KeyError on the missing weights, and the file's current graph drawn for an old run."""
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[dev]')")
    from dif_maml_dist.report import main as report_main

    run, graph_file, _ = edge_list_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    summary = json.loads((old / "summary.json").read_text())
    for key in ("edge_weights", "self_weights"):
        summary.pop(key, None)
    (old / "summary.json").write_text(json.dumps(summary))
    graph_file.write_text(_OTHER_GRAPH)
    drawn = _capture_topology_drawing(monkeypatch)
    out = tmp_path / "report"
    assert report_main([str(old), "--out", str(out)]) == 0
    assert (out / "topology.png").stat().st_size > 10_000 and "](topology.png)" in (out / "report.md").read_text()
    assert drawn["edges"] == {(0, 1), (1, 2), (2, 3)} and "labels" not in drawn, drawn


@pytest.mark.parametrize("strategy", ["dif_maml", "centralized", "noncooperative"])
def test_topology_to_draw_shows_each_strategys_own_graph_from_the_summary(strategy):
    """``topology_to_draw`` on a summary with the recorded weights of paper6 under each strategy gives the pairs
    its matrix combines (dif_maml: the graph; centralized: every pair at 1/K; noncooperative: none) labelled with
    their weights, and the same pairs unlabelled from a summary without them (an older run's). Catches centralized
    drawn as the base graph, noncooperative drawn with edges, and weights recorded for large networks."""
    from dif_maml_dist.config import TopologyConfig
    from dif_maml_dist.graphs.topology import build_topology, strategy_weights
    from dif_maml_dist.report import topology_to_draw
    from dif_maml_dist.run.outputs import RECORD_WEIGHTS_UP_TO, recorded_weights

    topo = build_topology(TopologyConfig(name="paper6"))
    w = strategy_weights(strategy, topo)
    combining = {(u, v) for u in range(6) for v in range(u + 1, 6) if w[u, v] > 0}
    assert len(combining) == {"dif_maml": 6, "centralized": 15, "noncooperative": 0}[strategy]
    summary = {"num_agents": 6, "strategy": strategy, "edges": sorted(sorted(e) for e in topo.graph.edges),
               **recorded_weights(w)}
    drawing = topology_to_draw(summary)
    assert drawing.num_agents == 6 and set(drawing.edges) == combining
    assert drawing.labels == {(u, v): f"{w[u, v]:.3f}" for u, v in combining}
    del summary["edge_weights"], summary["self_weights"]
    drawing = topology_to_draw(summary)
    assert set(drawing.edges) == combining and drawing.labels is None
    assert recorded_weights(np.eye(RECORD_WEIGHTS_UP_TO + 1)) == {}  # large networks: the summary stays small


def test_validation_keeps_the_centroid_of_the_iteration_with_the_best_validation_accuracy(tmp_path):
    """train.validate=true on an Omniglot fixture under the background/evaluation protocol: the network records
    carry the centroid's validation accuracy at every evaluation; models/best_centroid.pt is the centroid of the
    first iteration with the highest of them (its validation accuracy, recomputed from the saved file, is that
    maximum), and summary.json's best_centroid test figures are that file's figures on the final test set.
    Catches a best kept by the wrong metric or the last improvement missed, a saved file that is not the
    selected model, and test figures of the final model reported as the best's."""
    from tests.test_omniglot import PROTOCOL_LAYOUT, make_fixture

    make_fixture(tmp_path / "data", PROTOCOL_LAYOUT)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.threads=1",
                           "task=omniglot_5w1s", f"data.root={tmp_path / 'data'}", "task.split=background_evaluation",
                           "task.val_alphabets=1", "task.n_way=2", "task.q_query=3", "model.filters=4",
                           "topology=ring", "topology.num_agents=2", "task.meta_batch=2", "train.iterations=16",
                           "train.eval_every=2", "task.eval_tasks=10", "task.final_eval_tasks=12",
                           "maml.final_adapt_steps=2", "optim.lr=0.01", "train.validate=true",
                           f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
    accuracies = [(r["iteration"], r["centroid_val_acc_post"]) for r in records]
    assert len(accuracies) == 9 and len({a for _, a in accuracies}) > 1  # evaluations at 0, 2, ..., 16 that differ
    best_acc = max(a for _, a in accuracies)
    best_iteration = next(i for i, a in accuracies if a == best_acc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_centroid"]["iteration"] == best_iteration
    assert summary["best_centroid"]["val_accuracy"] == pytest.approx(best_acc)
    assert json.loads((run_dir / "models" / "best_centroid.json").read_text())["iteration"] == best_iteration

    run = load_run(run_dir)
    assert "best_centroid" in run.model_names
    learner = run.learner()
    saved = run.model("best_centroid")
    val = learner.curves(saved.state, 1, 0, len(learner.validation),
                         validation=True)
    assert float(val[1][:, 1].mean()) == pytest.approx(best_acc, abs=1e-6)
    test = run.evaluate(["best_centroid"], steps=2)["models"]["best_centroid"]
    assert summary["best_centroid"]["test_accuracy"] == pytest.approx(test["accuracy"][1], abs=1e-6)
    assert summary["best_centroid"]["accuracy_curve"] == pytest.approx(test["accuracy"], abs=1e-6)


def test_a_transparent_drawing_among_your_episodes_keeps_its_strokes(omniglot_run, tmp_path):
    """An Omniglot run's ``--episodes`` image drawn as black ink on a transparent background (a drawing app's RGBA
    export) is decoded exactly as the same drawing on white paper: ink bright on a dark background. Catches the
    alpha dropped by PIL's convert("L"), which made every such image all ink (accuracy at chance, no warning)."""
    from PIL import Image

    from dif_maml_dist import load_run

    run_dir, _ = omniglot_run
    family = load_run(run_dir).learner().family
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)  # transparent black ...
    rgba[5:25, 13:17] = (0, 0, 0, 255)  # ... but for a stroke of opaque black
    paper = np.full((30, 30), 255, dtype=np.uint8)
    paper[5:25, 13:17] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    Image.fromarray(paper, "L").save(tmp_path / "paper.png")
    on_paper = family.image(tmp_path / "paper.png")
    torch.testing.assert_close(family.image(tmp_path / "transparent.png"), on_paper)
    assert on_paper.shape == (1, 28, 28) and 0.05 < float(on_paper.mean()) < 0.3  # a stroke, not all ink
