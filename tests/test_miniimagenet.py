"""MiniImagenet reader on generated fixtures in both standard layouts, and its bad-data errors."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dif_maml_dist.tasks.miniimagenet import load_miniimagenet


def class_color(c: int) -> tuple[int, int, int]:
    return (40 * c % 256, 255 - 30 * c % 256, 90)


def pickle_fixture(root: Path, split: str, classes: int = 3, per_class: int = 4) -> None:
    """``mini-imagenet-cache-SPLIT.pkl``: each class a solid colour, images shuffled in image_data."""
    class_dict = {}
    order = np.random.default_rng(0).permutation(classes * per_class)
    data = np.zeros((classes * per_class, 84, 84, 3), dtype=np.uint8)
    for c in range(classes):
        idx = order[c * per_class:(c + 1) * per_class]
        data[idx] = class_color(c)
        class_dict[f"n{c:08d}"] = idx.tolist()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f)


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
    load comes from the cache file."""
    (pickle_fixture if layout == "pickle" else csv_fixture)(tmp_path, "train")
    data = load_miniimagenet(tmp_path, "train")
    assert data.images.shape == (3, 4, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.classes == ("n00000000", "n00000001", "n00000002")
    for c in range(3):
        mean = data.images[c].float().mean(dim=(0, 2, 3))
        assert torch.allclose(mean, torch.tensor(class_color(c), dtype=torch.float), atol=3.0)  # JPEG tolerance
    assert (tmp_path / "miniimagenet-train-84.pt").is_file()
    assert torch.equal(load_miniimagenet(tmp_path, "train").images, data.images)


def test_bad_data_errors_name_the_file(tmp_path):
    """Missing split, a CSV naming a missing image, a corrupted JPEG, a broken pickle: one line each, saying
    which file; no cache is written."""
    pickle_fixture(tmp_path / "p", "train")
    with pytest.raises(ValueError, match=r"MiniImagenet val split not found in .*: expected mini-imagenet-cache-val"):
        load_miniimagenet(tmp_path / "p", "val")
    csv_fixture(tmp_path / "c", "test")
    (tmp_path / "c/images/n0000000100000002.jpg").unlink()
    with pytest.raises(ValueError, match=r"test\.csv names n0000000100000002\.jpg, which is not in"):
        load_miniimagenet(tmp_path / "c", "test")
    csv_fixture(tmp_path / "d", "test")
    (tmp_path / "d/images/n0000000200000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode MiniImagenet image .*n0000000200000001\.jpg"):
        load_miniimagenet(tmp_path / "d", "test")
    (tmp_path / "e").mkdir()
    (tmp_path / "e/mini-imagenet-cache-train.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read MiniImagenet pickle"):
        load_miniimagenet(tmp_path / "e", "train")
    assert not list(tmp_path.glob("*/miniimagenet-*.pt"))
