"""task=image_folder: few-shot episodes from class folders, shared or each agent's own, with their cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dif_maml_dist.config import Config
from dif_maml_dist.tasks.image_folder import ImageFolderFamily
from dif_maml_dist.tasks.images import decode
from tests.helpers import REPO
from tests.test_omniglot import make_fixture


def make_classes(root: Path, counts: dict[str, int], seed: int = 0, mode: str = "L") -> Path:
    """``root/<class>/<i>.png``: random 12x12 images, each class around its own grey level."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(20 * c + 40, 30, (12, 12)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "L")
            (img.convert(mode) if mode != "L" else img).save(root / name / f"{i}.png")
    return root


def cfg_for(**data) -> Config:
    cfg = Config()
    cfg.task.name, cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query = "image_folder", 3, 1, 2
    cfg.task.rotations, cfg.task.image_size, cfg.task.channels = False, 16, 1
    for key, value in data.items():
        setattr(cfg.data, key, None if value is None else str(value))
    return cfg


def test_transparent_drawing_keeps_its_strokes():
    """Black ink on a transparent background (a drawing app's RGBA export) is composited onto white: the strokes
    stay dark and the background white. Catches convert("L") dropping the alpha, which turns the whole image into
    ink (every image alike: accuracy at chance, with no warning)."""
    import tempfile

    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[4:12, 7:9] = (0, 0, 0, 255)  # ... but a vertical stroke of opaque black
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "drawing.png"
        Image.fromarray(rgba, "RGBA").save(path)
        pixels = decode(path, 1, 16)[0]
    assert pixels[8, 8] < 10 and pixels[0, 0] > 245 and (pixels > 245).mean() > 0.8


def test_episodes_from_split_folders_and_a_cache_that_survives_a_move(tmp_path, monkeypatch):
    """ROOT/train and ROOT/test of class folders: 3-way 1-shot episodes of the training classes, test tasks
    identical in two processes' families, standardised with the training classes' statistics. The dataset folder
    is read-only (the cache goes to data.cache_dir), and the same dataset copied elsewhere (times kept) is found
    in the cache again rather than decoded anew.

    Catches a cache written beside read-only data, a fingerprint of absolute paths (rebuilt after a move), test
    classes leaking into training, and test sets that differ between processes."""
    import dif_maml_dist.tasks.image_folder as image_folder
    from tests.helpers import read_only

    data = tmp_path / "data"
    make_classes(data / "train", {f"t{i}": 4 for i in range(4)})
    make_classes(data / "test", {f"e{i}": 3 for i in range(3)}, seed=1)
    cache = tmp_path / "cache"
    with read_only(data):
        family = ImageFolderFamily(cfg_for(root=data, cache_dir=cache))
        batch = family.sampler(0, 1).sample(torch.Generator().manual_seed(0), 2)
        tests_a = family.eval_set(5, 4).slice(0, 4)
        tests_b = ImageFolderFamily(cfg_for(root=data, cache_dir=cache)).eval_set(5, 4).slice(0, 4)
    assert batch.support_x.shape == (2, 3, 1, 16, 16) and batch.query_x.shape == (2, 6, 1, 16, 16)
    assert sorted(batch.support_y[0].tolist()) == [0, 1, 2]
    assert abs(float(batch.support_x.mean())) < 1.0  # standardised
    assert torch.equal(tests_a.query_x, tests_b.query_x)
    cached = {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(cached) == 2  # one per split folder
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved)  # copy2 keeps modification times, as a move does
    monkeypatch.setattr(image_folder, "decode", lambda *a: pytest.fail("decoded again although cached"))
    ImageFolderFamily(cfg_for(root=moved, cache_dir=cache)).sampler(0, 1)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == cached


def test_each_agents_own_class_folders_train_through_the_command(tmp_path):
    """runtime=simulate on 3 agents, each with its own class folders (data.agent_root) and a shared test folder:
    the run trains and reports accuracy for every agent and the centroid.

    Catches the family not reaching the command line (config group, registry), per-agent roots not filled in, and
    a missing accuracy metric."""
    for k in range(3):
        make_classes(tmp_path / "sites" / f"site{k}", {f"k{k}c{i}": 3 for i in range(3)}, seed=k)
    make_classes(tmp_path / "test", {f"e{i}": 3 for i in range(3)}, seed=9)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "task=image_folder", "topology=ring",
         "topology.num_agents=3", f"data.agent_root='{tmp_path}/sites/site{{agent}}'", f"data.test_root={tmp_path}/test",
         f"data.cache_dir={tmp_path}/cache", "task.n_way=3", "task.q_query=2", "task.image_size=16", "model.filters=8",
         "task.meta_batch=2", "train.iterations=4", "train.eval_every=2", "task.eval_tasks=4",
         "task.final_eval_tasks=4", "maml.final_adapt_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["agents"]) == 3 and 0.0 <= summary["centroid_test_accuracy"] <= 1.0


@pytest.mark.parametrize("case", ["too_few_images", "not_an_image", "agent_without_test_classes"])
def test_bad_class_folders_are_one_line_naming_them(tmp_path, case):
    """A class with fewer images than an episode takes, a file that is not an image, and an agent's own split
    folders without test classes to hold out (per-agent data, no shared test folder): each refused in one line
    naming the folder or file (and the fix). Catches tracebacks from PIL or from stacking ragged classes, and an
    agent that could not be tested."""
    data = make_classes(tmp_path / "data", {f"c{i}": 3 for i in range(4)})
    expect = {"too_few_images": f"class folder {data / 'c1'} holds 2 images, fewer than the 3",
              "not_an_image": f"cannot read image {data / 'c2' / 'notes.txt'}",
              "agent_without_test_classes": f"{tmp_path / 'site0'} has a train/ folder but no test/ folder"}[case]
    if case == "too_few_images":
        (data / "c1" / "0.png").unlink()
    if case == "not_an_image":
        (data / "c2" / "notes.txt").write_text("not an image\n")
    if case == "agent_without_test_classes":
        shutil.copytree(data, tmp_path / "site0" / "train")
    cfg = cfg_for(root=data, cache_dir=tmp_path / "cache") if case != "agent_without_test_classes" else cfg_for(
        agent_root=tmp_path / "site{agent}", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError) as refused:
        family = ImageFolderFamily(cfg)
        family.sampler(0, 1)
        family.held_out_set(0, 1, 0, 1)
    assert expect in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert not any(p.suffix == ".pt" for p in data.rglob("*"))


def test_each_agent_is_tested_on_held_out_classes_of_its_own_and_the_run_evaluated_later(tmp_path):
    """Each agent's own train/ and test/ class folders and no shared test folder: the simulator's figures of
    agent k are agent k's own test classes' (checked against adapting the saved model by hand, task by task, on
    that agent's held-out episodes), and the centroid's are those of the union of the agents' shares of their
    held-out episodes, task j from agent j % 3.

    Catches agents tested on another agent's (or a shared) test set, test classes leaking into training, and a
    centroid figure over the wrong tasks."""
    import torch.nn.functional as F

    from dif_maml_dist import load_run
    from dif_maml_dist.engine.learner import held_out_share

    for k in range(3):
        make_classes(tmp_path / "sites" / f"site{k}" / "train", {f"k{k}c{i}": 3 for i in range(3)}, seed=k)
        make_classes(tmp_path / "sites" / f"site{k}" / "test", {f"k{k}e{i}": 3 for i in range(3)}, seed=10 + k)
    run_dir, n = tmp_path / "run", 5
    proc = subprocess.run(
        [sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "task=image_folder", "topology=ring",
         "topology.num_agents=3", f"data.agent_root='{tmp_path}/sites/site{{agent}}'", f"data.cache_dir={tmp_path}/c",
         "task.n_way=3", "task.q_query=2", "task.image_size=16", "model.filters=8", "task.meta_batch=2",
         "train.iterations=4", "train.eval_every=2", "task.eval_tasks=4", f"task.final_eval_tasks={n}",
         "maml.final_adapt_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    run = load_run(run_dir)
    family, steps = ImageFolderFamily(run.cfg), run.cfg.maml.eval_inner_steps

    def losses(model, agent: int, tasks: int) -> list[float]:
        held_out = family.held_out_set(agent, 3, run.cfg.seed, n)
        out = []
        for i in range(tasks):
            task = held_out.slice(i, i + 1)
            adapted = model.adapt(task.support_x[0], task.support_y[0], steps=steps)
            out.append(float(F.cross_entropy(adapted(task.query_x[0]), task.query_y[0])))
        return out

    for k in range(3):
        mine = losses(run.model(f"agent{k}"), k, n)
        assert summary["agents"][k]["final_test_loss"] == pytest.approx(np.mean(mine), rel=1e-4)
    union = [loss for k in range(3) for loss in losses(run.model("centroid"), k, held_out_share(n, k, 3))]
    assert len(union) == n and summary["centroid_test_loss"] == pytest.approx(np.mean(union), rel=1e-4)
    # The held-out classes stay with their agents: evaluating the run later takes a shared test folder (or the
    # user's own episodes), and says so when given neither.
    evaluate = [sys.executable, "-m", "dif_maml_dist.evaluate", str(run_dir)]
    refused = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "give --test-root DIR" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    make_classes(tmp_path / "shared_test", {f"s{i}": 3 for i in range(3)}, seed=20)
    done = subprocess.run([*evaluate, "--test-root", str(tmp_path / "shared_test"), "--tasks", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "evaluation.json").read_text())["tasks"] == 3
    # ... and on the user's own episode, its images decoded as the run decodes its folders (family.image)
    for c in range(3):
        for part, i in (("support", 0), ("query", 1), ("query", 2)):
            (tmp_path / "episodes" / "e0" / part / f"s{c}").mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "shared_test" / f"s{c}" / f"{i}.png", tmp_path / "episodes" / "e0" / part / f"s{c}")
    mine = subprocess.run([*evaluate, "--episodes", str(tmp_path / "episodes")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert json.loads((run_dir / "evaluation.json").read_text())["tasks"] == 1


def test_ragged_classes_keep_every_image_and_episodes_stay_within_each_class(tmp_path):
    """Six classes of 3 to 10 images, each image a flat grey of its own, split by task.split_seed (training:
    a, b, e, f): every episode image is one of the training classes' own, all images under one label are of one
    class, and all 10 images of the big class b are drawn. Catches classes cut to the smallest class's count
    (images 3..9 of b never drawn), offsets into a neighbouring class or past a class's last image, and a split
    that picks the wrong rows of the flat image tensor."""
    counts = {"a": 3, "b": 10, "c": 4, "d": 5, "e": 4, "f": 6}
    owner = {}  # grey level -> (class, image)
    for name, n in counts.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(n):
            owner[20 + 6 * len(owner)] = (name, i)
            Image.fromarray(np.full((12, 12), 14 + 6 * len(owner), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i:02d}.png")
    cfg = cfg_for(root=tmp_path / "data", cache_dir=tmp_path / "cache")
    cfg.task.image_size, cfg.task.standardise = 12, False
    batch = ImageFolderFamily(cfg).sampler(0, 1).sample(torch.Generator().manual_seed(0), 60)
    drawn = set()
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        grey = (x * 255).round().long()
        assert torch.equal(grey, grey[..., :1, :1].expand_as(grey))  # flat images, not blends of two
        for task in range(60):
            label_class = {}
            for level, label in zip(grey[task, :, 0, 0, 0].tolist(), y[task].tolist()):
                name, i = owner[level]
                assert label_class.setdefault(label, name) == name
                drawn.add((name, i))
    assert {name for name, _ in drawn} == {"a", "b", "e", "f"}  # drawn_split(6, seed 0)'s training classes
    assert {i for name, i in drawn if name == "b"} == set(range(10))


@pytest.mark.parametrize("split", ["random", "background_evaluation"])
def test_omniglot_exported_to_folders_gives_task_omniglots_episodes(tmp_path, split):
    """examples/omniglot_to_folders.py on a fixture in Omniglot's layout (each drawing marked apart), read by
    task=image_folder with task.invert=true task.standardise=false: each agent's training episodes (rotations,
    disjoint classes) and the test episodes are the very tensors task=omniglot makes from the same seeds, so the
    two families train and test alike (docs/results.md checks it on the real dataset).

    Catches an export split otherwise than task=omniglot's, class folders that sort in another order (other
    classes drawn for the same seed), drawings in another order, ink not inverted, and pixels standardised."""
    import importlib.util

    from dif_maml_dist.run.validate import validate
    from dif_maml_dist.tasks.omniglot import OmniglotFamily

    # evaluation alphabets that sort among the background ones, as Omniglot's do
    make_fixture(tmp_path, {"images_background": {"Beta": 3, "Delta": 3, "Epsilon": 3, "Zeta": 3},
                            "images_evaluation": {"Alpha": 3, "Gamma": 3}})
    for png in (tmp_path / "omniglot-py").rglob("*.png"):
        ink, d = np.array(Image.open(png)), int(png.stem[-2:])
        ink[5 * d:5 * d + 3, 90:100] = False  # a mark of the drawing's own
        Image.fromarray(ink).save(png)
    spec = importlib.util.spec_from_file_location("omniglot_to_folders", REPO / "examples" / "omniglot_to_folders.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    export.main([str(tmp_path), str(tmp_path / "folders"), f"--split={split}", "--val-alphabets=1"])

    def configured(**data) -> Config:
        cfg = cfg_for(**data)
        cfg.task.image_size, cfg.task.rotations, cfg.task.sharing, cfg.task.split = 28, True, "disjoint_classes", split
        cfg.task.val_alphabets = 1
        return cfg

    omniglot = configured(root=tmp_path)
    omniglot.task.name = "omniglot"
    folders = configured(root=tmp_path / "folders", cache_dir=tmp_path / "cache")
    folders.task.split, folders.task.invert, folders.task.standardise = "random", True, False
    families = OmniglotFamily(validate(omniglot)), ImageFolderFamily(validate(folders))
    for agent in (0, 1):
        a, b = (f.sampler(agent, 2).sample(torch.Generator().manual_seed(agent), 12) for f in families)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())), agent
    a, b = (f.eval_set(3, 20).slice(0, 20) for f in families)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert a.support_x.max() == 1.0 and a.support_x[..., -1].max() == 0.0  # bright ink, a dark page


def test_image_folders_decoding_switches_are_refused_for_other_families():
    """task.invert / task.standardise=false with a built-in family that decodes its own way: one line (they would
    be silently ignored)."""
    from dif_maml_dist.run.validate import validate

    cfg = Config()
    cfg.task.name, cfg.data.root, cfg.task.invert = "omniglot", "/data", True
    with pytest.raises(ValueError, match=r"^task.invert and task.standardise are image_folder's decoding switches; "
                                         r"task=omniglot decodes its dataset its own way: drop them$"):
        validate(cfg)


def test_images_of_mixed_modes_and_sizes_are_converted_alike(tmp_path):
    """One grey picture saved as 8-bit grayscale, RGB, a palette image, RGBA (opaque) and 16-bit grayscale, at two
    sizes: each decodes to the same grayscale pixels (within rounding) at task.image_size, and RGB decoding gives
    three equal channels. Catches 16-bit grayscale (scientific and medical scans) clipped at 255 rather than scaled,
    which PIL's convert("L") does and which made such images almost all white, a mode decoded differently
    (palette indices taken as pixel values, alpha dropped), and sizes left unresized."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8), "L")
    saved = {"L": grey, "RGB": grey.convert("RGB"), "P": grey.convert("RGB").convert("P", palette=Image.ADAPTIVE),
             "RGBA": grey.convert("RGBA"), "I;16": Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257),
             "small": grey.resize((16, 16), Image.LANCZOS), "wide": grey.resize((40, 24), Image.LANCZOS)}
    decoded = {}
    for name, img in saved.items():
        img.save(tmp_path / f"{name.replace(';', '')}.png")
        decoded[name] = decode(tmp_path / f"{name.replace(';', '')}.png", 1, 16).astype(int)
        assert decoded[name].shape == (1, 16, 16), name
    for name in ("RGB", "RGBA", "I;16"):
        assert np.abs(decoded[name] - decoded["L"]).max() <= 1, name
    for name in ("P", "small", "wide"):  # a palette's quantisation and a second resize blur a little
        assert np.abs(decoded[name] - decoded["L"]).mean() < 12, name
    rgb = decode(tmp_path / "RGB.png", 3, 16)
    assert rgb.shape == (3, 16, 16) and (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()
