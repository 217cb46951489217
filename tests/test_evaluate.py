"""After training: dif_maml_dist.evaluate (command line and Python API) and dif_maml_dist.report on short real
runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dif_maml_dist import load_run
from dif_maml_dist.evaluate import main as evaluate_main
from dif_maml_dist.maml import adaptation_curves_loop

from .helpers import REPO


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
    curve, _ = adaptation_curves_loop(learner.model.first_order_forward, F.mse_loss, model.params, batch,
                                      run.cfg.maml.inner_lr, 3)
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
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    """Each mistake ends in one line naming it, exit status 2, and no file written."""
    (tmp_path / "empty").mkdir()
    args = [a.format(run=run_dir, missing=tmp_path / "nope", empty=tmp_path / "empty") for a in args]
    before = sorted(p for p in run_dir.rglob("*"))
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dif_maml_dist.evaluate: error: ") and message in err and "\n" not in err, err
    assert sorted(p for p in run_dir.rglob("*")) == before


def test_a_run_without_models_is_refused(tmp_path, capsys):
    """A run directory whose models are missing (unfinished, or train.save_models=false) says so."""
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    from dif_maml_dist.config import Config
    from omegaconf import OmegaConf

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


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory):
    """A short Omniglot run on a generated fixture in the real folder layout (5 test characters)."""
    from .test_omniglot import make_fixture

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


def _episode(root, support, query, image):
    for split, classes in (("support", support), ("query", query)):
        for c in classes:
            (root / "e0" / split / c).mkdir(parents=True, exist_ok=True)
            if image is not None:
                (root / "e0" / split / c / "a.png").write_bytes(image)


@pytest.mark.parametrize("case, message", [
    ("three_classes", "has 3 support classes but the model has 5 outputs"),
    ("empty_class", "is empty: give it at least one image"),
    ("unreadable", "cannot decode Omniglot image"),
    ("query_only_class", "query class 'z' has no support folder"),
])
def test_bad_episodes_are_one_line_exit_2(omniglot_run, tmp_path, capsys, case, message):
    """A wrong class count for the model's head, an empty class folder, an unreadable image and a query class
    absent from the support each stop with one line naming the folder or file, exit status 2."""
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
    else:
        _episode(tmp_path, five, five + ["z"], png)
    assert evaluate_main([str(run_dir), "--episodes", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "x.json").exists()


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


def test_validation_keeps_the_centroid_of_the_iteration_with_the_best_validation_accuracy(tmp_path):
    """train.validate=true on an Omniglot fixture under the background/evaluation protocol: the network records
    carry the centroid's validation accuracy at every evaluation; models/best_centroid.pt is the centroid of the
    first iteration with the highest of them (its validation accuracy, recomputed from the saved file, is that
    maximum), and summary.json's best_centroid test figures are that file's figures on the final test set.
    Catches a best kept by the wrong metric or the last improvement missed, a saved file that is not the
    selected model, and test figures of the final model reported as the best's."""
    from .test_omniglot import PROTOCOL_LAYOUT, make_fixture

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
    val = learner.curves(learner.layout.join(saved.params), run.cfg.maml.inner_lr, 1, 0, len(learner.validation),
                         validation=True)
    assert float(val[1][:, 1].mean()) == pytest.approx(best_acc, abs=1e-6)
    test = run.evaluate(["best_centroid"], steps=2)["models"]["best_centroid"]
    assert summary["best_centroid"]["test_accuracy"] == pytest.approx(test["accuracy"][1], abs=1e-6)
    assert summary["best_centroid"]["accuracy_curve"] == pytest.approx(test["accuracy"], abs=1e-6)
