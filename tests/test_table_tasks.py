"""task=table_tasks: one task per CSV file, regression or classification, shared or each agent's own files; the
sinusoid's tasks served back from CSV files; each bad table refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dif_maml_dist import load_run
from dif_maml_dist.config import Config
from dif_maml_dist.tasks import TableFamily
from dif_maml_dist.tasks.sinusoid import SinusoidTasks
from tests.helpers import REPO


def write_csv(path: Path, columns: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(columns) + "\n" + "".join(",".join(map(repr, r)) + "\n" for r in rows))
    return path


def read_by_hand(path: Path) -> tuple[list[str], list[list[str]]]:
    """The reference reader: the header and the cells of every line, split at commas."""
    lines = path.read_text().splitlines()
    return lines[0].split(","), [line.split(",") for line in lines[1:]]


def cfg_for(**settings) -> Config:
    cfg = Config()
    cfg.task.name, cfg.task.num_support, cfg.task.num_query = "table_tasks", 3, 2
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, str(value) if isinstance(value, Path) else value)
    return cfg


def test_episodes_are_rows_of_one_file_standardised_with_the_training_files_only(tmp_path):
    """ROOT/train and ROOT/test of CSV files (an extra column to ignore, columns in another order in one file):
    every episode is support + query rows of a single file, drawn without replacement, with the targets exactly as
    written and the features standardised with the means and deviations of the training files' rows (computed
    here by hand) -- test files too, although theirs differ by 100. A smaller test set is a prefix of a larger
    one, and task.sharing=disjoint_classes deals each agent its own files.

    Catches rows mixed across files, rows drawn twice, the target standardised or the support and query swapped,
    statistics that include the test files, columns read by position rather than name, and test sets that depend
    on their size."""
    rng = np.random.default_rng(0)
    for split, n, shift in (("train", 4, 0.0), ("test", 2, 100.0)):
        for i in range(n):
            x = rng.normal(shift, 1 + i, (6, 2)) + [0, 50]
            rows = np.column_stack([x, rng.normal(size=6), rng.normal(size=6)])
            columns = ["temp", "load", "note", "y"] if i else ["y", "note", "load", "temp"]
            write_csv(tmp_path / "data" / split / f"m{i}.csv", columns,
                      [list(r) if i else [r[3], r[2], r[1], r[0]] for r in rows.tolist()])
    by_hand = {}
    for f in sorted((tmp_path / "data").rglob("*.csv")):
        names, cells = read_by_hand(f)
        by_hand[f] = np.array([[float(c[names.index(k)]) for k in ("temp", "load", "y")] for c in cells])
    train_rows = np.concatenate([v for f, v in by_hand.items() if f.parent.name == "train"])
    mean, std = train_rows[:, :2].mean(axis=0), train_rows[:, :2].std(axis=0)

    family = TableFamily(cfg_for(data__root=tmp_path / "data", task__features=["temp", "load"]))
    np.testing.assert_allclose(family.stats[0], mean, rtol=1e-12)
    np.testing.assert_allclose(family.stats[1], std, rtol=1e-12)

    def source(batch, t, split) -> Path:
        """The one file all of episode t's rows come from (each row found by hand, once)."""
        rows = torch.cat([torch.cat([batch.support_x[t], batch.support_y[t]], 1),
                          torch.cat([batch.query_x[t], batch.query_y[t]], 1)]).numpy()
        found = set()
        for row in rows:
            hits = [(f, i) for f, v in by_hand.items() if f.parent.name == split for i in range(len(v))
                    if v[i, 2] == row[2] and np.allclose((v[i, :2] - mean) / std, row[:2], rtol=1e-12, atol=1e-12)]
            assert len(hits) == 1, row
            found.add(hits[0])
        assert len(found) == len(rows)  # without replacement
        assert len({f for f, _ in found}) == 1
        return hits[0][0]

    batch = family.sampler(0, 1).sample(torch.Generator().manual_seed(1), 8)
    assert batch.support_x.shape == (8, 3, 2) and batch.query_y.shape == (8, 2, 1)
    assert batch.support_x.dtype == torch.float64
    assert len({source(batch, t, "train") for t in range(8)}) > 1
    tests = family.eval_set(3, 5)
    for t in range(5):
        source(tests, t, "test")
    assert torch.equal(family.eval_set(3, 2).query_x, tests.query_x[:2])
    family = TableFamily(cfg_for(data__root=tmp_path / "data", task__features=["temp", "load"],
                                 task__sharing="disjoint_classes"))
    mine = family.sampler(1, 2).sample(torch.Generator().manual_seed(2), 8)
    assert {source(mine, t, "train").name for t in range(8)} <= {"m2.csv", "m3.csv"}


def test_rows_of_a_long_log_are_drawn_distinct_and_uniformly():
    """draw_rows on many rows (the draw-until-distinct path) and on few (a permutation): k distinct indices in
    range, every row about equally often (20,000 draws of 2 of 200 rows: 200 each expected).

    Catches rows drawn twice in an episode, an index off the end, and a draw biased towards some rows."""
    from dif_maml_dist.tasks.table_tasks import draw_rows

    gen = torch.Generator().manual_seed(0)
    for n, k in ((100_000, 20), (30, 20)):
        for _ in range(50):
            rows = draw_rows(n, k, gen)
            assert len(set(rows.tolist())) == k and 0 <= rows.min() and rows.max() < n
    pairs = np.stack([draw_rows(200, 2, gen) for _ in range(20_000)])  # 1 in 200 would repeat a row if allowed
    assert (pairs[:, 0] != pairs[:, 1]).all()
    counts = np.bincount(pairs.ravel(), minlength=200)
    assert counts.min() > 140 and counts.max() < 260, (counts.min(), counts.max())


def test_classification_labels_are_numbered_per_episode(tmp_path):
    """3-way 2-shot, 1 query per class, from files whose labels are words (one file with a fourth label): every
    episode's support labels are 0,0,1,1,2,2 and its query labels 0,1,2; each episode label stands for one of the
    file's labels (its rows, found by hand, all carry it), different episode labels for different file labels, the
    same one in support and query; label 0 stands for different file labels in different episodes. The family
    gives cross-entropy, accuracy and a 3-way MLP.

    Catches labels fixed across episodes (a model could learn them without adapting), a class's rows mixed with
    another's, and query labels numbered apart from the support's."""
    rng = np.random.default_rng(0)
    for i, labels in enumerate([("ok", "warn", "fault"), ("ok", "warn", "fault", "idle")]):
        rows = [[*rng.normal(size=2).tolist(), lab] for lab in labels for _ in range(4)]
        path = tmp_path / "data" / "train" / f"m{i}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a,b,state\n" + "".join(f"{a!r},{b!r},{lab}\n" for a, b, lab in rows))
    (tmp_path / "data" / "test").mkdir()
    (tmp_path / "data" / "test" / "t.csv").write_bytes((tmp_path / "data" / "train" / "m0.csv").read_bytes())
    label_of = {}
    for f in sorted((tmp_path / "data" / "train").glob("*.csv")):
        _, cells = read_by_hand(f)
        label_of.update({(float(a), float(b)): lab for a, b, lab in cells})
    family = TableFamily(cfg_for(data__root=tmp_path / "data", task__target="state",
                                 task__target_type="classification", task__n_way=3, task__k_shot=2, task__q_query=1))
    assert family.criterion is torch.nn.functional.cross_entropy and family.metric is not None
    assert family.build_model()[-1].out_features == 3
    batch = family.sampler(0, 1).sample(torch.Generator().manual_seed(0), 12)
    mean, std = family.stats
    zero_stands_for = Counter()
    for t in range(12):
        assert batch.support_y[t].tolist() == [0, 0, 1, 1, 2, 2] and batch.query_y[t].tolist() == [0, 1, 2]
        stands_for = {}
        for x, y in [*zip(batch.support_x[t], batch.support_y[t]), *zip(batch.query_x[t], batch.query_y[t])]:
            raw = tuple(np.round(x.numpy() * std + mean, 12))
            original = next(lab for key, lab in label_of.items() if np.allclose(key, raw, rtol=1e-10))
            assert stands_for.setdefault(int(y), original) == original
        assert len(set(stands_for.values())) == 3
        zero_stands_for[stands_for[0]] += 1
    assert len(zero_stands_for) > 1


def test_sinusoid_tasks_written_to_csv_are_served_back_and_train(tmp_path):
    """The sinusoid as a table family: agent k's sinusoid tasks (its amplitude slice, tasks/sinusoid.py) written
    one CSV of x,y per task into agent k's own folder, the sinusoid's test tasks into a shared test folder. Each
    episode table_tasks serves is exactly the points of one of that agent's sinusoid tasks (float64, bit for
    bit: no standardisation with each agent's own data), split 5 support + 5 query. Then runtime=simulate trains
    3 agents on those folders through the command (data.agent_root, data.test_root) and the centroid's test loss
    falls (3.81 to 2.72 here).

    Catches per-agent folders not filled in or mixed up, features altered on the way (standardised without
    common statistics, rounded through text), and the family not reaching the command line or not training."""
    cfg = cfg_for(data__agent_root=tmp_path / "sites" / "site{agent}", data__test_root=tmp_path / "test",
                  task__num_support=5, task__num_query=5)
    points = {}
    for k in range(3):
        tasks = SinusoidTasks(cfg.task, k, 3).sample(torch.Generator().manual_seed(k), 12)
        xy = torch.cat([torch.cat([tasks.support_x, tasks.query_x], 1), torch.cat([tasks.support_y, tasks.query_y], 1)],
                       2)
        points[k] = [sorted(map(tuple, task.tolist())) for task in xy]
        for i, task in enumerate(xy.tolist()):
            write_csv(tmp_path / "sites" / f"site{k}" / f"task{i:02d}.csv", ["x", "y"], task)
    tests = SinusoidTasks.eval_set(cfg.task, 0, 50)
    for i in range(50):
        write_csv(tmp_path / "test" / f"task{i:02d}.csv", ["x", "y"],
                  torch.cat([torch.cat([tests.support_x[i], tests.query_x[i]]),
                             torch.cat([tests.support_y[i], tests.query_y[i]])], 1).tolist())
    family = TableFamily(cfg)
    for k in range(3):
        batch = family.sampler(k, 3).sample(torch.Generator().manual_seed(9), 20)
        assert batch.support_x.shape == (20, 5, 1) and batch.query_x.shape == (20, 5, 1)
        for t in range(20):
            served = torch.cat([torch.cat([batch.support_x[t], batch.query_x[t]]),
                                torch.cat([batch.support_y[t], batch.query_y[t]])], 1)
            assert sorted(map(tuple, served.tolist())) in points[k]

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "task=table_tasks", "topology=ring",
         "topology.num_agents=3", f"data.agent_root='{tmp_path}/sites/site{{agent}}'",
         f"data.test_root={tmp_path}/test", "task.num_support=5", "task.num_query=5", "train.iterations=100",
         "train.eval_every=100", "task.eval_tasks=50", "task.final_eval_tasks=50", "optim.lr=0.01",
         "maml.final_adapt_steps=2", "train.checkpoint_every=0", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluations = [json.loads(line) for line in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
    assert evaluations[0]["iteration"] == 0 and evaluations[-1]["iteration"] == 100
    assert evaluations[-1]["centroid_test_loss_post"] < 0.9 * evaluations[0]["centroid_test_loss_post"], evaluations

    # The trained centroid on three test tasks given as the user's own episode files (evaluate --episodes): before
    # adapting, its loss is its MSE on their query points, computed here with the saved model.
    run = load_run(run_dir)
    mse = []
    for i in range(3):
        split = [["support"]] * 5 + [["query"]] * 5
        (tmp_path / "episodes").mkdir(exist_ok=True)
        (tmp_path / "episodes" / f"e{i}.csv").write_text("split,x,y\n" + "".join(
            f"{s[0]},{x!r},{y!r}\n" for s, x, y in zip(split, torch.cat([tests.support_x[i], tests.query_x[i]]).
                                                      flatten().tolist(),
                                                      torch.cat([tests.support_y[i], tests.query_y[i]]).flatten()
                                                      .tolist())))
        prediction = run.model("centroid")(tests.query_x[i])
        mse.append(float(((prediction.double() - tests.query_y[i]) ** 2).mean()))
    figures = run.evaluate(["centroid"], steps=1, episodes=tmp_path / "episodes")["models"]["centroid"]
    assert figures["loss"][0] == pytest.approx(sum(mse) / 3, rel=1e-5)


def test_your_own_episode_files_are_read_as_the_run_reads_its_tables(tmp_path):
    """evaluate --episodes on a table run: an episode file with the run's columns (in another order, and one more)
    and a split column gives its support and query rows, features standardised with the run's training files'
    statistics, labels numbered 0..n_way-1 in sorted order of the support's labels; an episode whose labels do
    not fit the model's head is refused in one line.

    Catches a user's features fed to the model unstandardised (the sinusoid's split,x,y reader would), labels
    numbered by order of appearance, and query rows taken as support."""
    from dif_maml_dist.tasks.user_episodes import read_episodes

    rng = np.random.default_rng(0)
    for i in range(3):
        rows = [[*(rng.normal(size=2) * [1, 10] + [0, 100]).tolist(), lab] for lab in "ab" for _ in range(3)]
        write_csv(tmp_path / "data" / f"m{i}.csv", ["a", "b", "state"], rows)
    family = TableFamily(cfg_for(data__root=tmp_path / "data", task__target="state",
                                 task__target_type="classification", task__n_way=2, task__k_shot=1, task__q_query=2))
    mean, std = family.stats
    (tmp_path / "ep").mkdir()
    (tmp_path / "ep" / "one.csv").write_text(
        "note,state,split,b,a\nx,warn,query,101.5,0.5\nx,warn,support,102,1\nx,ok,support,99,-1\nx,ok,query,98,-2\n")
    batch = read_episodes(tmp_path / "ep", family, 2)["one"]
    raw = lambda x: (x.numpy() * std + mean).round(9).tolist()  # noqa: E731
    assert raw(batch.support_x[0]) == [[1, 102], [-1, 99]] and batch.support_y[0].tolist() == [1, 0]
    assert raw(batch.query_x[0]) == [[0.5, 101.5], [-2, 98]] and batch.query_y[0].tolist() == [1, 0]
    (tmp_path / "ep" / "one.csv").write_text("state,split,a,b\nok,support,1,2\nok,query,1,2\n")
    with pytest.raises(ValueError) as refused:
        read_episodes(tmp_path / "ep", family, 2)
    assert str(refused.value) == (f"{tmp_path / 'ep' / 'one.csv'} has support rows of 1 label (ok), but the model "
                                  f"is 2-way (task.n_way): give the episode 2 labels")


def _bad_data(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """A data set with one mistake, the overrides that read it, and what the error must say."""
    data, sites = tmp_path / "data", tmp_path / "sites"
    rng = np.random.default_rng(0)
    for i in range(4):
        write_csv(data / f"m{i}.csv", ["temp", "load", "y"], rng.normal(size=(6, 3)).tolist())
    shared = [f"data.root={data}", "task.features=[temp,load]"]
    for k in range(2):
        write_csv(sites / f"site{k}" / "m.csv", ["temp", "load", "y"], rng.normal(size=(6, 3)).tolist())
    write_csv(sites / "test" / "t.csv", ["temp", "load", "y"], rng.normal(size=(6, 3)).tolist())
    own = ["topology=ring", "topology.num_agents=2", f"data.agent_root='{sites}/site{{agent}}'",
           f"data.test_root={sites / 'test'}"]
    classes = ["task.target_type=classification", "task.n_way=2", "task.k_shot=2", "task.q_query=1"]
    if case == "missing_column":
        write_csv(data / "m2.csv", ["temp", "y"], [[1.0, 2.0]] * 6)
        return shared, f"{data / 'm2.csv'} has no column 'load' (task.features); its columns are: temp, y"
    if case == "not_a_number":
        (data / "m1.csv").write_text("temp,load,y\n1,2,3\n4,n/a,6\n")
        return shared, f"{data / 'm1.csv'}:3: column 'load' holds 'n/a', not a finite number"
    if case == "labels_as_regression_target":
        (data / "m1.csv").write_text("temp,load,y\n1,2,ok\n")
        return shared, f"{data / 'm1.csv'}:2: column 'y' holds 'ok', not a finite number (for a target of labels set " \
                       f"task.target_type=classification)"
    if case == "root_missing":
        return [f"data.root={tmp_path / 'nowhere'}"], f"data.root={tmp_path / 'nowhere'} does not exist"
    if case == "extra_column_without_features":
        write_csv(data / "m3.csv", ["temp", "load", "y", "hum"], [[1.0, 2.0, 3.0, 4.0]] * 6)
        return [f"data.root={data}"], f"{data / 'm3.csv'} has column 'hum' that the other files lack"
    if case == "too_few_rows":
        write_csv(data / "m0.csv", ["temp", "load", "y"], [[1.0, 2.0, 3.0]] * 4)
        return shared, f"{data / 'm0.csv'} has 4 rows, fewer than the 5 an episode takes (task.num_support"
    if case == "class_too_small":
        for i in range(4):
            (data / f"m{i}.csv").write_text("temp,load,y\n" + "1,2,a\n" * 3 + "1,2,b\n" * (3 if i != 1 else 2))
        return [*shared, *classes], f"{data / 'm1.csv'}: class 'b' has 2 rows, fewer than the 3 an episode takes"
    if case == "too_few_classes":
        for i in range(4):
            (data / f"m{i}.csv").write_text("temp,load,y\n" + "1,2,a\n" * 3 + ("1,2,b\n" * 3 if i != 2 else ""))
        return [*shared, *classes], f"{data / 'm2.csv'} has 1 label, fewer than the 2 classes of an episode"
    if case == "empty_folder":
        for f in data.iterdir():
            f.unlink()
        return shared, f"{data} holds no .csv files"
    if case == "agent_folder_missing":
        (sites / "site1" / "m.csv").unlink()
        (sites / "site1").rmdir()
        return own, f"agent 1: data folder {sites / 'site1'} does not exist"
    if case == "agent_folder_without_csv":
        (sites / "site0" / "m.csv").rename(sites / "site0" / "m.txt")
        return own, f"agent 0: {sites / 'site0'} holds no .csv files"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_column", "not_a_number", "labels_as_regression_target", "root_missing",
                                  "extra_column_without_features", "too_few_rows", "class_too_small",
                                  "too_few_classes", "empty_folder", "agent_folder_missing",
                                  "agent_folder_without_csv"])
def test_a_bad_table_is_one_line_naming_it(tmp_path, case):
    """Each mistake in the tables is refused before anything is written, in one line naming the file (and line
    and column, or the agent and folder) and what is wrong; the real command exits 2 with that line alone for a
    non-numeric cell.

    Catches tracebacks from float() or numpy reaching the user, a missing column reported without the columns
    there are, a file too short for an episode found only mid-run, and an agent's missing data not said as whose."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare

    args, expect = _bad_data(tmp_path, case)
    args = ["runtime=simulate", "task=table_tasks", "task.num_support=3", "task.num_query=2", *args]
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        prepare([*args, f"hydra.run.dir={run_dir}"], ProcessEnv())
    message = str(refused.value)
    assert expect in message and "\n" not in message, message
    assert not run_dir.exists()
    if case == "not_a_number":
        proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", *args, f"hydra.run.dir={run_dir}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"dif_maml_dist: error: {message}"]
        assert not run_dir.exists()


def test_the_readmes_table_command_runs_as_it_stands(tmp_path):
    """The README's table command, run verbatim by bash in a fresh folder after the example block's make_data.py
    line (the virtualenv first on PATH, as after the quick start): it trains and writes its summary, and the CSV
    lines the README shows are those make_data.py writes.

    Catches the README's table example drifting from the code: a renamed option, a changed default, a sample that
    is no longer what the example data holds."""
    import re

    readme = (REPO / "README.md").read_text()
    example = re.search(r"<!-- example-check: [^>]*-->\s*\n```bash\n(.*?)\n```", readme, re.S)
    command = re.search(r"<!-- tables-check: [^>]*-->\s*\n```bash\n(.*?)\n```", readme, re.S)
    shown = re.search(r"```text\n\$ head -3 (\S+)\n(.*?)\n```", readme, re.S)
    assert example and command and shown, "the README lost its table example"
    make_data = [line for line in example.group(1).splitlines() if "make_data.py" in line]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join([*make_data, command.group(1)])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "runs" / "site_tables" / "summary.json").read_text())
    assert summary["num_agents"] == 4 and summary["iterations"] == 200
    assert (tmp_path / shown.group(1)).read_text().splitlines()[:3] == shown.group(2).splitlines()


def test_each_agent_without_a_shared_test_folder_is_tested_on_files_held_out_of_its_own(tmp_path):
    """Each agent's own CSV files and no data.test_root: a fifth of the agent's files (drawn with
    task.split_seed) are its held-out test tasks, never served for training, and every training file is; without
    task.features the columns cannot be agreed on without a common file, which is said in one line.

    Catches held-out files leaking into training (or the other way round), an agent tested on another agent's
    files, and agents free to pick different feature columns (models of different shapes)."""
    for k in range(2):
        for i in range(5):
            write_csv(tmp_path / "sites" / f"site{k}" / f"m{i}.csv", ["a", "y"],
                      [[100.0 * k + 10 * i + r, float(r)] for r in range(6)])
    with pytest.raises(ValueError, match="needs the feature columns named, task.features") as refused:
        TableFamily(cfg_for(data__agent_root=tmp_path / "sites" / "site{agent}"))
    assert "\n" not in str(refused.value)
    family = TableFamily(cfg_for(data__agent_root=tmp_path / "sites" / "site{agent}", task__features=["a"]))
    for k in range(2):
        def files(batch) -> set[int]:  # which of agent k's files each task's rows come from (a // 10 mod 10)
            x = torch.cat([batch.support_x, batch.query_x], 1)[..., 0]
            assert ((x - 100 * k) >= 0).all() and ((x - 100 * k) < 100).all()  # agent k's own rows only
            per_task = ((x - 100 * k) // 10).long()
            assert (per_task == per_task[:, :1]).all()  # one file per task
            return set(per_task[:, 0].tolist())

        train = files(family.sampler(k, 2).sample(torch.Generator().manual_seed(0), 60))
        held_out = files(family.held_out_set(k, 2, 0, 20))
        assert len(held_out) == 1 and train == set(range(5)) - held_out
