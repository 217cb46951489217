"""MiniImagenet reader on generated fixtures in both standard layouts, and its bad-data errors."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dif_maml_dist.config import Config
from dif_maml_dist.run.validate import validate
from dif_maml_dist.tasks.miniimagenet import MiniImagenetFamily, load_miniimagenet


def class_color(c: int) -> tuple[int, int, int]:
    return (40 * c % 256, 255 - 30 * c % 256, 90 + 7 * c % 100)


def pickle_fixture(root: Path, split: str, classes: int = 3, per_class: int = 4, first: int = 0) -> np.ndarray:
    """``mini-imagenet-cache-SPLIT.pkl``: class ``first + c`` a solid colour, images shuffled in image_data;
    returns image_data."""
    class_dict = {}
    order = np.random.default_rng(0).permutation(classes * per_class)
    data = np.zeros((classes * per_class, 84, 84, 3), dtype=np.uint8)
    for c in range(classes):
        idx = order[c * per_class:(c + 1) * per_class]
        data[idx] = class_color(first + c)
        class_dict[f"n{first + c:08d}"] = idx.tolist()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return data


def csv_fixture(root: Path, split: str, classes: int = 3, per_class: int = 4, size: int = 100) -> None:
    """``images/*.jpg`` + ``SPLIT.csv``, original-resolution JPEGs (resized to 84 by the reader)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / f"{split}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for c in range(classes):
            for i in range(per_class):
                name = f"n{c:08d}{i:08d}.jpg"
                Image.new("RGB", (size, size), class_color(c)).save(root / "images" / name)
                w.writerow([name, f"n{c:08d}"])


@pytest.mark.parametrize("layout", ["pickle", "csv"])
def test_both_layouts_give_the_same_classes(tmp_path, layout):
    """Classes sorted by name, images grouped by class as [C, n, 3, 84, 84] uint8, colours preserved; the second
    load comes from the cache file, and a changed dataset rebuilds it (catches a stale cache used silently)."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    (pickle_fixture if layout == "pickle" else csv_fixture)(root, "train")
    data = load_miniimagenet(root, "train", cache_dir=cache)
    assert data.images.shape == (3, 4, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.classes == ("n00000000", "n00000001", "n00000002")
    for c in range(3):
        mean = data.images[c].float().mean(dim=(0, 2, 3))
        assert torch.allclose(mean, torch.tensor(class_color(c), dtype=torch.float), atol=3.0)  # JPEG tolerance
    assert len(list(cache.glob("miniimagenet-train-84-*.pt"))) == 1
    assert torch.equal(load_miniimagenet(root, "train", cache_dir=cache).images, data.images)
    # The dataset changes (one more class): the cache follows it instead of serving the old classes.
    (pickle_fixture if layout == "pickle" else csv_fixture)(root, "train", classes=4)
    assert load_miniimagenet(root, "train", cache_dir=cache).classes[-1] == "n00000003"


@pytest.mark.parametrize("layout", ["pickle", "csv"])
def test_read_only_dataset_moved_or_holding_only_an_old_cache(tmp_path, monkeypatch, layout):
    """A read-only dataset folder is decoded into data.cache_dir and read from there; the same files copied to
    another path with their times reuse that cache (not decoded again, the file untouched); a folder that holds
    only the cache earlier versions wrote into it (ROOT/miniimagenet-train-84.pt) is read as it is, writing
    nothing. Catches the cache written into the dataset folder (OSError: Read-only file system), a fingerprint of
    absolute paths (rebuilt for every mount point), and a cache-only dataset refused as missing."""
    import dif_maml_dist.tasks.miniimagenet as miniimagenet
    from tests.helpers import read_only

    root, cache = tmp_path / "data", tmp_path / "cache"
    (pickle_fixture if layout == "pickle" else csv_fixture)(root, "train")
    with read_only(root):
        built = load_miniimagenet(root, "train", cache_dir=cache)
    [path] = cache.glob("*.pt")
    stamp = path.stat().st_mtime_ns
    moved = tmp_path / "elsewhere" / "mnt"
    shutil.copytree(root, moved)  # copy2 keeps modification times, as a move does
    for decode in ("_from_pickle", "_from_csv"):
        monkeypatch.setattr(miniimagenet, decode, lambda *a: pytest.fail("decoded again although cached"))
    with read_only(moved):
        assert torch.equal(load_miniimagenet(moved, "train", cache_dir=cache).images, built.images)
    assert list(cache.glob("*.pt")) == [path] and path.stat().st_mtime_ns == stamp
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(path, alone / "miniimagenet-train-84.pt")
    with read_only(alone):
        old = load_miniimagenet(alone, "train", cache_dir=tmp_path / "other")
        assert torch.equal(old.images, built.images) and old.mean == built.mean
        del old
    assert not (tmp_path / "other").exists()


def test_bad_data_errors_name_the_file(tmp_path):
    """Missing split, a CSV naming a missing image, a corrupted JPEG, a broken pickle: one line each, saying
    which file; no cache is written."""
    cache = tmp_path / "cache"
    pickle_fixture(tmp_path / "p", "train")
    with pytest.raises(ValueError, match=r"MiniImagenet val split not found in .*: expected mini-imagenet-cache-val"):
        load_miniimagenet(tmp_path / "p", "val", cache_dir=cache)
    csv_fixture(tmp_path / "c", "test")
    (tmp_path / "c/images/n0000000100000002.jpg").unlink()
    with pytest.raises(ValueError, match=r"test\.csv names n0000000100000002\.jpg, which is not in"):
        load_miniimagenet(tmp_path / "c", "test", cache_dir=cache)
    csv_fixture(tmp_path / "d", "test")
    (tmp_path / "d/images/n0000000200000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode MiniImagenet image .*n0000000200000001\.jpg"):
        load_miniimagenet(tmp_path / "d", "test", cache_dir=cache)
    (tmp_path / "e").mkdir()
    (tmp_path / "e/mini-imagenet-cache-train.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read MiniImagenet pickle"):
        load_miniimagenet(tmp_path / "e", "train", cache_dir=cache)
    assert not list(tmp_path.glob("**/miniimagenet-*.pt"))


def family(root: Path, **task) -> MiniImagenetFamily:
    cfg = Config()
    cfg.data.root = str(root)
    cfg.task.name, cfg.task.image_size, cfg.task.rotations = "miniimagenet", 84, False
    cfg.model.filters = 4
    for key, value in task.items():
        setattr(cfg.task, key, value)
    return MiniImagenetFamily(validate(cfg))


def test_episodes_are_standardised_rgb_tasks_from_the_right_split(tmp_path):
    """Training episodes come from the train split's classes, test tasks only from the test split's; pixels are
    standardised with the *train* split's channel statistics (recomputed here with numpy); within a task every
    image of a label has that class's colour, support and query alike.

    Catches RGB images reshaped as if grayscale, channel statistics of the wrong split or axis, a test set drawn
    from training classes, and labels that do not follow the class."""
    train = pickle_fixture(tmp_path, "train", classes=6, per_class=5)
    pickle_fixture(tmp_path, "test", classes=5, per_class=5, first=10)
    fam = family(tmp_path, n_way=5, k_shot=2, q_query=3)
    pixels = train.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pixels.mean(0), pixels.std(0)
    expected = {c: torch.tensor((np.array(class_color(c)) / 255.0 - mean) / std, dtype=torch.float32)
                for c in range(16)}

    def colour_of(img: torch.Tensor) -> int:
        value = img.mean(dim=(1, 2))
        assert torch.allclose(img, value.view(3, 1, 1).expand_as(img), atol=1e-5)  # a solid colour, per channel
        return min(expected, key=lambda c: float((expected[c] - value).abs().max()))

    def check(batch, allowed: range) -> None:
        for xs, ys, xq, yq in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            assert xs.shape == (10, 3, 84, 84) and xq.shape == (15, 3, 84, 84)
            colours = {}
            for x, y in [*zip(xs, ys), *zip(xq, yq)]:
                c = colour_of(x)
                assert c in allowed and torch.allclose(x[:, 0, 0], expected[c], atol=1e-5)
                assert colours.setdefault(int(y), c) == c  # one colour per label within the task
            assert len(set(colours.values())) == 5  # five distinct classes

    check(fam.sampler(0, 1).sample(torch.Generator().manual_seed(0), 3), range(0, 6))
    check(fam.eval_set(seed=0, num_tasks=3).slice(0, 3), range(10, 15))
    assert fam.build_model()(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_class_sharing_and_too_few_classes(tmp_path):
    """disjoint_classes partitions the train classes among agents; with too few classes per agent for N-way, or
    alphabets asked of MiniImagenet, the error is one line saying what to change.

    Catches overlapping or missing class shares and an N-way larger than the classes on offer going unnoticed."""
    pickle_fixture(tmp_path, "train", classes=10, per_class=5)
    pickle_fixture(tmp_path, "test", classes=5, per_class=5, first=10)
    fam = family(tmp_path, n_way=5, q_query=2, sharing="disjoint_classes")
    shares = [[c for c, _ in fam.sampler(k, 2).classes] for k in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(10)) and not set(shares[0]) & set(shares[1])
    # 10 classes dealt to 3 agents: 4, 3, 3
    with pytest.raises(ValueError, match=r"^agent 0 \(task.sharing=disjoint_classes, MiniImagenet train split\): "
                                         r"5-way episodes need 5 classes, but only 4 are available; lower task.n_way$"):
        family(tmp_path, n_way=5, q_query=2, sharing="disjoint_classes").sampler(0, 3)
    with pytest.raises(ValueError, match=r"^MiniImagenet test split: 6-way episodes need 6 classes, but only 5"):
        family(tmp_path, n_way=6, q_query=2).eval_set(0, 2)
    with pytest.raises(ValueError, match="task.sharing=alphabets needs Omniglot's alphabets"):
        family(tmp_path, sharing="alphabets")
