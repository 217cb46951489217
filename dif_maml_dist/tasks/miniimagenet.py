"""MiniImagenet on disk -> one cached tensor file per split (uint8, 84 x 84 RGB).

Two common layouts are read:

- the pickle caches ``ROOT/mini-imagenet-cache-{train,val,test}.pkl`` (a dict with ``image_data``, an
  ``[N, 84, 84, 3]`` uint8 array, and ``class_dict``, class name -> image indices). Unpickling runs code from the
  file: only point ``data.root`` at files you trust;
- Ravi & Larochelle's ``ROOT/images/*.jpg`` with ``ROOT/{train,val,test}.csv`` (header ``filename,label``).

Either way the split is decoded once into a cache file in ``data.cache_dir`` (``weights_only`` loadable; see
:mod:`dif_maml_dist.tasks.cache`), with the split's per-channel pixel mean and standard deviation; the dataset folder
is only read. Training uses the ``train`` split, evaluation the ``test`` split; ``val`` is read only if asked for.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import Config
from dif_maml_dist.learning.models import Conv4
from dif_maml_dist.tasks.cache import load_cached, source_fingerprint
from dif_maml_dist.tasks.episodes import EpisodeSet, FewShotEpisodes, accuracy, share_classes
from dif_maml_dist.tasks.images import read_image

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassImages:
    """``images[c, i]``: image i of class c, uint8 ``[3, size, size]``; every class has the same count."""

    images: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  #: per-channel pixel mean of the split, pixels scaled to [0, 1]
    std: tuple[float, float, float]  #: per-channel pixel standard deviation, same scale


def _equal_counts(per_class: dict[str, list], source: str) -> int:
    counts = {name: len(v) for name, v in per_class.items()}
    if not counts:
        raise ValueError(f"{source} lists no images")
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{source}: class {empty[0]} has no images")
    return min(counts.values())  # the standard splits have 600 per class; a ragged copy is cut to its smallest


def _from_pickle(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    try:
        with path.open("rb") as f:
            data = pickle.load(f)  # noqa: S301 (the dataset's own format; see the module docstring)
        images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"cannot read MiniImagenet pickle {path}: {err!r}; expected a dict with 'image_data' and "
                         f"'class_dict'") from None
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: image_data has shape {images.shape}, expected [N, H, W, 3]")
    names = sorted(class_dict)
    n = _equal_counts({k: list(class_dict[k]) for k in names}, str(path))
    out = np.stack([images[np.asarray(class_dict[k][:n])] for k in names])  # [C, n, H, W, 3]
    if out.shape[2] != size:
        out = np.stack([[_resize(img, size) for img in cls] for cls in out])
    return out, names


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.uint8)


def _from_csv(root: Path, split: str, size: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    per_class: dict[str, list[str]] = {}
    with (root / f"{split}.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if "filename" not in row or "label" not in row:
                raise ValueError(f"{root / f'{split}.csv'}: expected the header 'filename,label'")
            per_class.setdefault(row["label"], []).append(row["filename"])
    names = sorted(per_class)
    n = _equal_counts(per_class, str(root / f"{split}.csv"))
    out = np.zeros((len(names), n, size, size, 3), dtype=np.uint8)
    for c, name in enumerate(names):
        for i, filename in enumerate(per_class[name][:n]):
            path = root / "images" / filename
            if not path.is_file():
                raise ValueError(f"{root / f'{split}.csv'} names {filename}, which is not in {root / 'images'}")
            try:
                with Image.open(path) as img:
                    out[c, i] = _resize(np.asarray(img.convert("RGB")), size)
            except (UnidentifiedImageError, OSError, SyntaxError) as err:
                raise ValueError(f"cannot decode MiniImagenet image {path}: {err}; delete or replace the "
                                 f"file") from None
    return out, names


def load_miniimagenet(root: Path, split: str, size: int = 84, cache_dir: Optional[str | Path] = None) -> ClassImages:
    """One split's images (decoded and cached in ``cache_dir`` on first use). A ``root`` that holds only
    ``miniimagenet-{split}-{size}.pt`` (as earlier versions wrote it there) is read from that file. Raises
    ``ValueError`` naming what is missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown MiniImagenet split {split!r}; choose one of: {', '.join(SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"MiniImagenet root {root} is not a folder; set data.root=DIR to the folder holding "
                         f"mini-imagenet-cache-{{train,test}}.pkl, or images/ with train.csv and test.csv")
    legacy = root / f"miniimagenet-{split}-{size}.pt"
    pkl, table, image_dir = root / f"mini-imagenet-cache-{split}.pkl", root / f"{split}.csv", root / "images"
    if not (legacy.is_file() or pkl.is_file() or (table.is_file() and image_dir.is_dir())):
        raise ValueError(f"MiniImagenet {split} split not found in {root}: expected mini-imagenet-cache-{split}.pkl, "
                         f"or {split}.csv with an images/ folder")

    def build() -> dict:
        images, names = _from_pickle(pkl, size) if pkl.is_file() else _from_csv(root, split, size)
        pixels = images.reshape(-1, 3)
        return {"images": torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(), "classes": names,
                "mean": (pixels.mean(axis=0, dtype=np.float64) / 255.0).tolist(),
                "std": (pixels.std(axis=0, dtype=np.float64) / 255.0).tolist()}

    if pkl.is_file():
        fingerprint = source_fingerprint(root, [pkl], dataset="miniimagenet", split=split, size=size)
    elif table.is_file() and image_dir.is_dir():
        fingerprint = source_fingerprint(root, [table, *sorted(image_dir.iterdir())], dataset="miniimagenet",
                                         split=split, size=size)
    else:  # only the cache is left
        fingerprint = None
    data = load_cached(cache_dir, f"miniimagenet-{split}-{size}", build, fingerprint, legacy)
    return ClassImages(data["images"], tuple(data["classes"]), tuple(data["mean"]), tuple(data["std"]))


class MiniImagenetFamily:
    """MiniImagenet N-way K-shot classification with a Conv4 (32 filters, 84 x 84 RGB inputs standardised with the
    training split's channel statistics) under cross-entropy; accuracy reported. Test tasks come from the test
    split's classes."""

    reads_agent_data = False  #: one shared dataset (data.root); data.agent_root is refused
    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)
    #: test tasks adapted at once: bounds memory (a 5-way task with 15 queries per class through Conv4-32 at 84 x 84
    #: is ~70 MB of first-layer activations in float32)
    eval_chunk = 2

    def __init__(self, cfg: Config):
        self.cfg = cfg
        root, size = Path(cfg.data.root), cfg.task.image_size
        self.train = load_miniimagenet(root, "train", size, cfg.data.cache_dir)
        self.test = load_miniimagenet(root, "test", size, cfg.data.cache_dir)

    def build_model(self) -> Conv4:
        t = self.cfg.task
        return Conv4(3, t.n_way, self.cfg.model.filters, t.image_size)

    def _episodes(self, data: ClassImages, classes: list[int], rotations: bool) -> FewShotEpisodes:
        t = self.cfg.task
        return FewShotEpisodes(data.images, classes, t.n_way, t.k_shot, t.q_query, rotations,
                               mean=self.train.mean, std=self.train.std)

    def sampler(self, agent: int, num_agents: int) -> FewShotEpisodes:
        t = self.cfg.task
        classes = share_classes(range(len(self.train.classes)), t.sharing, agent, num_agents)
        try:
            return self._episodes(self.train, classes, t.rotations)
        except ValueError as err:
            raise ValueError(f"agent {agent} (task.sharing={t.sharing}, MiniImagenet train split): {err}") from None

    def image(self, path: Path) -> torch.Tensor:
        """A user's image as this family's episodes hold theirs: RGB, resized, scaled to [0, 1] and standardised
        with the training split's channel statistics, ``[3, H, W]``."""
        pixels = _resize(np.asarray(read_image(Path(path), 3)), self.cfg.task.image_size)
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
        return (x - torch.tensor(self.train.mean).view(3, 1, 1)) / torch.tensor(self.train.std).view(3, 1, 1)

    def eval_set(self, seed: int, num_tasks: int) -> EpisodeSet:
        try:
            test = self._episodes(self.test, list(range(len(self.test.classes))), rotations=False)
        except ValueError as err:
            raise ValueError(f"MiniImagenet test split: {err}") from None
        return test.episode_set(seeding.generator(seed, seeding.Stream.EVAL), num_tasks)
