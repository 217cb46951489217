"""Omniglot reader, cache and episodes on small fixtures in the real on-disk layout (and, when present, the
real dataset from ../shared/data)."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dif_maml_dist.tasks.episodes import FewShotEpisodes
from dif_maml_dist.tasks.omniglot import load_omniglot, split_classes
from tests.helpers import REPO, figures_of

#: torchvision's Omniglot archive: $OMNIGLOT_TARBALL, or where this project's machines keep it (beside the checkout).
REAL_TARBALL = Path(os.environ.get("OMNIGLOT_TARBALL") or REPO.parent / "shared" / "data" / "omniglot-py.tar.gz")


def make_fixture(root: Path, layout: dict[str, dict[str, int]], drawings: int = 20) -> Path:
    """``root/omniglot-py/<part>/<alphabet>/characterNN/*.png``: 105x105 1-bit images, each character a
    distinct filled square (so a test can tell classes and rotations apart)."""
    c = 0
    for part, alphabets in layout.items():
        for alphabet, n_chars in alphabets.items():
            for j in range(n_chars):
                folder = root / "omniglot-py" / part / alphabet / f"character{j + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    img = np.ones((105, 105), dtype=bool)  # white paper
                    img[10 + 5 * c: 30 + 5 * c, 10:40] = False  # black ink, position encodes the class
                    Image.fromarray(img).save(folder / f"{c:04d}_{d + 1:02d}.png")
                c += 1
    return root


LAYOUT = {"images_background": {"Alpha": 3, "Beta": 2}, "images_evaluation": {"Gamma": 2}}


def test_reader_builds_a_cache_once_in_the_documented_layout(tmp_path, monkeypatch):
    """Reads the folders (no zip files), one row per character in a fixed order, ink as high values; the second
    load reads the cache instead of decoding PNGs again."""
    make_fixture(tmp_path, LAYOUT)
    data = load_omniglot(tmp_path, progress=False)
    assert data.images.shape == (7, 20, 28, 28) and data.images.dtype == torch.uint8
    assert data.alphabets == ("background/Alpha",) * 3 + ("background/Beta",) * 2 + ("evaluation/Gamma",) * 2
    assert data.images[0].float().mean() > 0 and data.images[0, :, -1, :].max() == 0  # ink inside, blank bottom
    assert not torch.equal(data.images[0, 0], data.images[1, 0])
    import dif_maml_dist.tasks.omniglot as omniglot
    monkeypatch.setattr(omniglot, "_decode", lambda *a: pytest.fail("decoded a PNG although a cache exists"))
    assert torch.equal(load_omniglot(tmp_path, progress=False).images, data.images)


def test_cache_is_rebuilt_when_the_dataset_changes_and_a_foreign_file_is_refused(tmp_path):
    """A cache follows its dataset: more characters extracted after the first run (or a drawing replaced) rebuild it
    with them. A truncated cache or a file that is not one of ours at the cache's path is a one-line error naming
    it, and is left as it was.
    Catches: a stale cache used silently (the new characters missing from training and test), a traceback from a
    broken cache file, and a user's file overwritten."""
    data, cache = make_fixture(tmp_path / "data", LAYOUT), tmp_path / "cache"
    first = load_omniglot(data, progress=False, cache_dir=cache)
    assert first.images.shape[0] == 7
    extra = tmp_path / "more"
    make_fixture(extra, {"images_evaluation": {"Delta": 1}})
    (extra / "omniglot-py/images_evaluation/Delta").rename(data / "omniglot-py/images_evaluation/Delta")
    grown = load_omniglot(data, progress=False, cache_dir=cache)
    assert grown.images.shape[0] == 8 and "evaluation/Delta" in grown.alphabets
    png = next((data / "omniglot-py/images_background/Alpha/character01").glob("*.png"))
    Image.fromarray(np.zeros((105, 105), dtype=bool)).save(png)  # an all-ink drawing replaces the first one
    before = set(cache.glob("*.pt"))
    assert not torch.equal(load_omniglot(data, progress=False, cache_dir=cache).images, grown.images)
    [built] = set(cache.glob("*.pt")) - before
    for content, expect in ((built.read_bytes()[:1000], "is not a readable dataset cache"),
                            (b"my notes", "is not a readable dataset cache")):
        built.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{re.escape(str(built))} {expect} .*delete it"):
            load_omniglot(data, progress=False, cache_dir=cache)
        assert built.read_bytes() == content
    torch.save({"weights": torch.zeros(3)}, built)  # a readable file, but not a dataset cache
    with pytest.raises(ValueError, match=f"^{re.escape(str(built))} is not a dataset cache written by dif_maml_dist"):
        load_omniglot(data, progress=False, cache_dir=cache)


def test_read_only_dataset_is_cached_in_cache_dir_and_found_again_after_a_move(tmp_path, monkeypatch):
    """A read-only dataset folder (as the compose cluster mounts /data) is decoded into data.cache_dir, with
    data.download=true too (the dataset is there: no download lock taken in it), and read from there on the next
    load; the same files copied to another path with their times are served from that cache, not decoded again.
    Catches the cache or its lock written into the dataset folder (OSError: Read-only file system), and a
    fingerprint of absolute paths, which rebuilds the cache for every mount point."""
    import dif_maml_dist.tasks.omniglot as omniglot
    from tests.helpers import read_only

    data, cache = make_fixture(tmp_path / "data", LAYOUT), tmp_path / "cache"
    files = sorted(p.relative_to(data) for p in data.rglob("*"))
    with read_only(data):
        built = load_omniglot(data, progress=False, download=True, cache_dir=cache)
        [path] = cache.glob("omniglot-28-*.pt")
        stamp = path.stat().st_mtime_ns
        monkeypatch.setattr(omniglot, "decode_all", lambda *a: pytest.fail("decoded again although cached"))
        assert torch.equal(load_omniglot(data, progress=False, cache_dir=cache).images, built.images)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == files
    moved = tmp_path / "elsewhere" / "mnt"
    shutil.copytree(data, moved)  # copy2 keeps modification times, as a move does
    assert torch.equal(load_omniglot(moved, progress=False, cache_dir=cache).images, built.images)
    assert list(cache.glob("*.pt")) == [path] and path.stat().st_mtime_ns == stamp


def test_a_dataset_folder_holding_only_an_old_cache_is_read_and_not_written(tmp_path):
    """Earlier versions cached into the dataset folder (ROOT/omniglot-py/cache-28.pt); a folder that holds only that
    file, the PNGs deleted, still serves, read-only and without writing any cache elsewhere. Catches a cache-only
    dataset refused as missing, or rewritten."""
    from tests.helpers import read_only

    data = make_fixture(tmp_path / "data", LAYOUT)
    built = load_omniglot(data, progress=False, cache_dir=tmp_path / "cache")
    [path] = (tmp_path / "cache").glob("*.pt")
    shutil.copy2(path, data / "omniglot-py/cache-28.pt")
    for part in ("images_background", "images_evaluation"):
        shutil.rmtree(data / "omniglot-py" / part)
    with read_only(data):
        alone = load_omniglot(data, progress=False, cache_dir=tmp_path / "other")
        assert torch.equal(alone.images, built.images) and alone.alphabets == built.alphabets
        del alone
    assert not (tmp_path / "other").exists()


def test_bad_data_errors_name_the_file_or_folder(tmp_path):
    """Missing root, an empty class folder and a corrupted PNG: one-line errors saying where."""
    with pytest.raises(ValueError, match=r"Omniglot not found: .*images_background is missing"):
        load_omniglot(tmp_path / "nowhere", progress=False)
    make_fixture(tmp_path / "a", LAYOUT)
    for png in (tmp_path / "a/omniglot-py/images_background/Beta/character02").glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match=r"Beta/character02 holds 0 PNG images, expected 20"):
        load_omniglot(tmp_path / "a", progress=False)
    make_fixture(tmp_path / "b", LAYOUT)
    bad = tmp_path / "b/omniglot-py/images_evaluation/Gamma/character01/0005_03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*Gamma/character01/0005_03\.png"):
        load_omniglot(tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no cache, not even half-written


def test_download_fetches_both_halves_once_through_torchvision(tmp_path, monkeypatch):
    """data.download=true asks torchvision for the background and the evaluation half into data.root (no network
    here: a stand-in for torchvision's class writes the fixture layout), and not again once they exist; a failed
    download is a one-line error that says how to do without internet.

    Catches a download that fetches one half only, lands outside torchvision's layout, or repeats every run."""
    import torchvision.datasets

    calls = []

    class FakeOmniglot:
        def __init__(self, root, background, download):
            calls.append((root, background, download))
            part = "images_background" if background else "images_evaluation"
            make_fixture(Path(root), {part: LAYOUT[part]})

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeOmniglot)
    data = load_omniglot(tmp_path / "d", progress=False, download=True)
    assert calls == [(str(tmp_path / "d"), True, True), (str(tmp_path / "d"), False, True)]
    assert data.images.shape[0] == 7
    load_omniglot(tmp_path / "d", progress=False, download=True, cache_dir=tmp_path / "elsewhere")  # decoded anew
    assert len(calls) == 2

    class Offline:
        def __init__(self, root, background, download):
            raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", Offline)
    with pytest.raises(ValueError, match=r"^could not download Omniglot \(images_background\) through torchvision "
                                         r"into .*: Temporary failure in name resolution; without internet, extract"):
        load_omniglot(tmp_path / "e", progress=False, download=True)


def test_episodes_are_n_way_k_shot_with_rotated_classes(tmp_path):
    """Support/query shapes and labels, distinct drawings for support and query, rotations as classes, and
    too few classes for N-way rejected."""
    make_fixture(tmp_path, LAYOUT)
    images = load_omniglot(tmp_path, progress=False).images
    episodes = FewShotEpisodes(images, [0, 1, 2], n_way=5, k_shot=1, q_query=3, rotations=True)  # 12 classes
    batch = episodes.sample(torch.Generator().manual_seed(0), 4)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 15, 1, 28, 28)
    assert batch.support_y[0].tolist() == [0, 1, 2, 3, 4] and batch.query_y[0].tolist() == sorted([0, 1, 2, 3, 4] * 3)
    assert 0.0 <= batch.support_x.min() and batch.support_x.max() <= 1.0
    # every query image of class j is a (rotated) drawing of the same character as support image j
    for j in range(5):
        s = batch.support_x[0, j, 0]
        for q in batch.query_x[0, 3 * j:3 * j + 3, 0]:
            assert torch.equal(q, s)  # fixture drawings of a character are identical, rotation included
    rotated = [torch.rot90(images[0, 0], r, dims=(0, 1)) for r in range(4)]
    assert len({tuple(r.flatten().tolist()) for r in rotated}) == 4  # the fixture's rotations are distinct
    with pytest.raises(ValueError, match="20-way episodes need 20 classes, but only 12 are available"):
        FewShotEpisodes(images, [0, 1, 2], n_way=20, k_shot=1, q_query=1, rotations=True)


def test_rotated_classes_are_rotated_drawings(tmp_path):
    """Every image of an episode is a character's drawing turned by the quarter turns of its class, and all four
    turns occur. Catches rotations dropped, applied to the wrong images, or applied twice."""
    make_fixture(tmp_path, LAYOUT)
    images = load_omniglot(tmp_path, progress=False).images
    episodes = FewShotEpisodes(images, [0, 1, 2, 3], n_way=5, k_shot=2, q_query=1, rotations=True)
    views = {(c, r): torch.rot90(images[c, 0], r, dims=(0, 1)).float() / 255 for c in range(4) for r in range(4)}
    batch = episodes.sample(torch.Generator().manual_seed(1), 20)
    seen = set()
    for x in torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1):
        match = [key for key, v in views.items() if torch.equal(x[0], v)]
        assert len(match) == 1
        seen.add(match[0][1])
    assert seen == {0, 1, 2, 3}


def test_lazy_test_set_and_chunked_evaluation_match_eager_ones(tmp_path):
    """The test set held as indices (EpisodeSet) gives, slice by slice, exactly the episodes sample() draws from
    the same seed, and Learner.evaluate gives the same figures whether it gathers 3 tasks at a time or all 10.

    Catches evaluation chunks that skip, repeat or reorder tasks, and a confidence interval computed per chunk."""
    from dif_maml_dist.config import Config
    from dif_maml_dist.engine.learner import Learner
    from dif_maml_dist.run.validate import validate

    make_fixture(tmp_path, LAYOUT)
    images = load_omniglot(tmp_path, progress=False).images
    episodes = FewShotEpisodes(images, [0, 1, 2], n_way=3, k_shot=1, q_query=2, rotations=True)
    lazy = episodes.episode_set(torch.Generator().manual_seed(5), 7)
    eager = episodes.sample(torch.Generator().manual_seed(5), 7)
    for a, b in zip(eager.tensors(), [torch.cat(t) for t in zip(*(lazy.slice(i, i + 3).tensors() for i in (0, 3, 6)))]):
        assert torch.equal(a, b)

    cfg = Config()
    cfg.data.root = str(tmp_path)
    # the 7-character fixture splits 5 / 0 / 2: two test characters, so 2-way test tasks
    cfg.task.name, cfg.task.n_way, cfg.task.q_query = "omniglot", 2, 2
    cfg.task.eval_tasks, cfg.task.final_eval_tasks = 4, 10
    cfg.model.filters = 4
    learner = Learner.build(validate(cfg), torch.device("cpu"), torch.float64)
    params = learner.layout.flatten(dict(learner.family.build_model().double().named_parameters())).detach()
    figures = []
    for chunk in (3, 10):
        learner.eval_chunk = chunk
        figures.append(figures_of(learner, params, 2, final=True))
    for key in ("loss", "accuracy", "accuracy_ci95"):
        np.testing.assert_allclose(figures[0][key], figures[1][key], rtol=1e-12, atol=1e-15)


def test_class_split_is_seeded_and_disjoint():
    """1623 characters -> 1100 / 100 / 423, reproducible from the seed, no character in two splits."""
    a, b = split_classes(1623, seed=0), split_classes(1623, seed=0)
    assert a == b and split_classes(1623, seed=1) != a
    assert [len(a[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])


@pytest.mark.skipif(not REAL_TARBALL.is_file(),
                    reason=f"real Omniglot not present at {REAL_TARBALL} (set OMNIGLOT_TARBALL)")
def test_real_omniglot(tmp_path):
    """The real dataset (opt-in: runs where ../shared/data holds it, as on CI): 1623 characters of 50 alphabets,
    964 of them in images_background; 20-way 1-shot episodes drawn from the test split."""
    with tarfile.open(REAL_TARBALL) as tar:
        tar.extractall(tmp_path, filter="data")
    data = load_omniglot(tmp_path, progress=False)
    assert data.images.shape == (1623, 20, 28, 28)
    assert len(set(data.alphabets)) == 50 and sum(a.startswith("background/") for a in data.alphabets) == 964
    ink = data.images.float().mean() / 255
    assert 0.03 < ink < 0.3  # strokes on blank paper, not inverted
    test = split_classes(data.num_classes, seed=0)["test"]
    batch = FewShotEpisodes(data.images, test, 20, 1, 1).sample(torch.Generator().manual_seed(0), 2)
    assert batch.support_x.shape == (2, 20, 1, 28, 28)


#: Background: 4 alphabets; evaluation: 2. Each character a distinct square, so ids map to files one to one.
PROTOCOL_LAYOUT = {"images_background": {"Alpha": 3, "Beta": 3, "Delta": 3, "Epsilon": 3},
                   "images_evaluation": {"Gamma": 3, "Zeta": 3}}


def _family(root, **task):
    from dif_maml_dist.config import Config
    from dif_maml_dist.run.validate import validate
    from dif_maml_dist.tasks.omniglot import OmniglotFamily

    cfg = Config()
    cfg.data.root = str(root)
    cfg.task.name, cfg.task.n_way, cfg.task.q_query = "omniglot", 2, 2
    for key, value in task.items():
        setattr(cfg.task, key, value)
    return OmniglotFamily(validate(cfg))


def test_background_evaluation_split_trains_on_background_and_tests_on_evaluation_alphabets(tmp_path):
    """task.split=background_evaluation on a fixture in the real folder layout: every character any agent samples
    for training is from a background alphabet that is not held out, every test character from an evaluation
    alphabet, and the validation characters are whole background alphabets disjoint from both; with every class
    sharing rule. Catches the random split leaking in, rotations of test characters used in training, and
    validation alphabets also trained on."""
    make_fixture(tmp_path, PROTOCOL_LAYOUT)
    for sharing in ("same", "disjoint_classes", "alphabets"):
        fam = _family(tmp_path, split="background_evaluation", val_alphabets=1, sharing=sharing)
        alphabet = fam.data.alphabets
        split = fam.split
        assert {alphabet[c] for c in split["test"]} == {"evaluation/Gamma", "evaluation/Zeta"}
        assert len({alphabet[c] for c in split["val"]}) == 1 and all(alphabet[c].startswith("background/")
                                                                     for c in split["val"])
        assert set(split["train"]) | set(split["val"]) == {c for c, a in enumerate(alphabet)
                                                          if a.startswith("background/")}
        assert not set(split["train"]) & set(split["val"])
        sampled = set()
        for agent in range(2):
            sampler = fam.sampler(agent, 2)
            picks = sampler.draw(torch.Generator().manual_seed(agent), 50)
            sampled |= set(picks[..., 0].flatten().tolist())
        assert sampled <= set(split["train"]) and sampled, sharing
        tested = set(fam.eval_set(0, 40).picks[..., 0].flatten().tolist())
        assert tested <= set(split["test"]) and len(tested) > 2
    # The held-out alphabets are drawn with task.split_seed: another seed, other alphabets (for some seed).
    held = {tuple(_family(tmp_path, split="background_evaluation", val_alphabets=2, split_seed=s).split["val"])
            for s in range(6)}
    assert len(held) > 1


def test_background_evaluation_split_refuses_bad_settings_in_one_line(tmp_path):
    """A dataset without one of the halves, and val_alphabets leaving no background alphabet to train on,
    stop with one line saying what to do."""
    make_fixture(tmp_path / "full", PROTOCOL_LAYOUT)
    with pytest.raises(ValueError, match=r"^task.val_alphabets=4 leaves no background alphabet to train on "
                                         r"\(there are 4\): use fewer$"):
        _family(tmp_path / "full", split="background_evaluation", val_alphabets=4)
    make_fixture(tmp_path / "half", {"images_background": {"Alpha": 3, "Beta": 3}})
    (tmp_path / "half" / "omniglot-py" / "images_evaluation").mkdir()
    with pytest.raises(ValueError, match=r"^task.split=background_evaluation needs both halves of Omniglot, but "
                                         r"images_evaluation holds no characters"):
        _family(tmp_path / "half", split="background_evaluation")
    from dif_maml_dist.config import Config
    from dif_maml_dist.run.validate import validate

    cfg = Config()
    cfg.task.split = "background_evaluation"
    with pytest.raises(ValueError, match=r"^task.split=background_evaluation is Omniglot's"):
        validate(cfg)  # the sinusoid has no such split
