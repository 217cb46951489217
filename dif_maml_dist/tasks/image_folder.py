"""Few-shot tasks from any dataset in the class-folder layout (``ROOT/<class>/<image>``, as torchvision's
``ImageFolder`` reads it): N-way K-shot episodes with Q queries per class.

Classes come split by folders (``ROOT/train/<class>/``, ``ROOT/val/<class>/``, ``ROOT/test/<class>/``) or, when
``ROOT`` holds class folders directly, drawn into train / validation / test with ``task.split_seed``. Each agent
reads its training classes from its own folder (``data.agent_root``) or from the shared ``data.root``; the test
classes come from ``data.test_root`` (required with per-agent data: every process must see the same test tasks)
or from the shared root's test split. Images are read with PIL, composited onto white when transparent, converted
to grayscale or RGB (``task.channels``), resized to ``task.image_size`` and, with ``task.invert``, inverted; with
shared data, pixels are standardised with the training classes' channel statistics only (``task.standardise``).
Classes may hold different numbers of images: every image is kept, and an episode draws a class's images among its
own. Every folder is decoded once into a cache file in ``data.cache_dir`` named by a fingerprint of the folder's
contents (relative paths, sizes, modification times), so a dataset moved or mounted elsewhere, or read-only, is
found again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import Config
from dif_maml_dist.learning.models import Conv4
from dif_maml_dist.tasks.cache import FORMAT, load_or_build
from dif_maml_dist.tasks.custom import agent_root
from dif_maml_dist.tasks.episodes import EpisodeSet, FewShotEpisodes, accuracy, share_classes

SPLIT_FOLDERS = ("train", "val", "test")
#: the share of classes in the validation and test sets when ROOT holds class folders directly
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2


@dataclass(frozen=True)
class FolderImages:
    """Every image of every class, uint8 ``[images, channels, size, size]``: the ``counts[c]`` images of class c
    follow those of the classes before it."""

    images: torch.Tensor
    counts: tuple[int, ...]
    classes: tuple[str, ...]

    def select(self, idx: list[int]) -> "FolderImages":
        """Classes ``idx`` only, in that order."""
        starts = np.cumsum([0, *self.counts])
        rows = torch.cat([torch.arange(starts[c], starts[c + 1]) for c in idx])
        return FolderImages(self.images[rows], tuple(self.counts[c] for c in idx),
                            tuple(self.classes[c] for c in idx))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dif_maml_dist"


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root``, sorted (``ValueError`` naming ``root`` when it holds none)."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    return folders


def _images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def decode(path: Path, channels: int, size: int, invert: bool = False) -> np.ndarray:
    """One image as uint8 ``[channels, size, size]``: transparency composited onto white (a drawing exported with
    a transparent background keeps its strokes), then grayscale or RGB, resized, and with ``invert`` turned to
    255 - pixel (dark strokes on light paper become bright on dark, as task=omniglot decodes its drawings).
    ``ValueError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.LANCZOS)
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                         f"delete or replace the file") from None
    if invert:
        pixels = 255 - pixels
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def fingerprint(folders: list[Path], root: Path, channels: int, size: int, invert: bool) -> str:
    """Of the images under ``root``: relative paths, sizes and modification times (the same after a move or under
    another mount point), and the decoding settings."""
    settings = {"format": FORMAT, "channels": channels, "size": size, "invert": invert}
    h = hashlib.sha256(json.dumps(settings).encode())
    for folder in folders:
        for f in _images_of(folder):
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_folder(root: Path, channels: int, size: int, invert: bool, need: int,
                cache_dir: Optional[Path]) -> FolderImages:
    """Every image of every class folder of ``root`` decoded (from the cache when it holds them); a class with
    fewer than ``need`` images is a ``ValueError`` naming it."""
    root = Path(root)
    folders = class_folders(root)
    counts = {f: len(_images_of(f)) for f in folders}
    short = [f for f, n in counts.items() if n < need]
    if short:
        raise ValueError(f"class folder {short[0]} holds {counts[short[0]]} images, fewer than the {need} an episode "
                         f"takes from a class (task.k_shot + task.q_query)")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = fingerprint(folders, root, channels, size, invert)

    def build() -> dict:
        listed = [_images_of(folder) for folder in folders]  # listed once: the counts are those of the images
        images = np.zeros((sum(map(len, listed)), channels, size, size), dtype=np.uint8)
        for i, f in enumerate(f for files in listed for f in files):
            images[i] = decode(f, channels, size, invert)
        return {"images": torch.from_numpy(images), "counts": [len(files) for files in listed],
                "classes": [f.name for f in folders]}

    data = load_or_build(cache_dir / f"image_folder-{key[:32]}.pt", build, key)
    return FolderImages(data["images"], tuple(data["counts"]), tuple(data["classes"]))


def drawn_split(num_classes: int, seed: int) -> dict[str, list[int]]:
    """Class indices drawn into train / val / test with ``seed`` (at least one training and one test class)."""
    test, val = max(1, round(num_classes * TEST_FRACTION)), round(num_classes * VAL_FRACTION)
    if num_classes - test - val < 1:
        raise ValueError(f"cannot split {num_classes} classes into train, validation and test sets: add classes, or "
                         f"give the split as folders ROOT/train/<class>/ and ROOT/test/<class>/")
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    return {"test": sorted(order[:test]), "val": sorted(order[test:test + val]), "train": sorted(order[test + val:])}


class ImageFolderFamily:
    """Few-shot classification on class folders, with a Conv4 (``model.filters``) under cross-entropy; accuracy."""

    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)
    eval_chunk = 4  #: test tasks adapted at once: bounds memory

    def __init__(self, cfg: Config):
        self.cfg, self.need = cfg, cfg.task.k_shot + cfg.task.q_query
        if cfg.data.agent_root is None and cfg.data.root is None:
            raise ValueError("task=image_folder needs data: data.root=DIR (shared) or data.agent_root=DIR (each "
                             "agent's own; {agent} becomes the agent's id)")
        if cfg.data.agent_root is not None and cfg.data.test_root is None:
            raise ValueError("task=image_folder with data.agent_root needs data.test_root=DIR: class folders of test "
                             "images that every node holds, so that every agent is tested on the same tasks")
        self._shared: Optional[dict[str, FolderImages]] = None

    # -- where the classes are ------------------------------------------------------------------------------------
    def _folder(self, root: Path) -> FolderImages:
        t = self.cfg.task
        return load_folder(root, t.channels, t.image_size, t.invert, self.need, self.cfg.data.cache_dir)

    def _load(self, root: Path) -> dict[str, FolderImages]:
        """``root``'s classes by split: its split folders, or its class folders split with ``task.split_seed``."""
        t = self.cfg.task
        if (root / "train").is_dir():
            return {s: self._folder(root / s) for s in SPLIT_FOLDERS if (root / s).is_dir()}
        every = self._folder(root)
        split = drawn_split(len(every.classes), t.split_seed)
        return {s: every.select(idx) for s, idx in split.items() if idx}

    def _shared_splits(self) -> dict[str, FolderImages]:
        if self._shared is None:
            self._shared = self._load(Path(self.cfg.data.root))
        return self._shared

    def _training(self, agent: int) -> FolderImages:
        if self.cfg.data.agent_root is None:
            return self._shared_splits()["train"]
        root = agent_root(self.cfg.data, agent)
        return self._folder(root / "train" if (root / "train").is_dir() else root)

    def _test(self) -> FolderImages:
        if self.cfg.data.test_root is not None:
            return self._folder(Path(self.cfg.data.test_root))
        splits = self._shared_splits()
        if "test" not in splits:
            raise ValueError(f"{self.cfg.data.root} has a train/ folder but no test/ folder: add "
                             f"{self.cfg.data.root}/test/<class>/, or set data.test_root=DIR")
        return splits["test"]

    @cached_property
    def _stats(self) -> tuple[Optional[list[float]], Optional[list[float]]]:
        """The channel statistics pixels are standardised with: the shared training classes'. With each agent's own
        data no statistics are common to all agents without exchanging them, so pixels stay on [0, 1] (the Conv4's
        first batch norm standardises its input's features per task anyway), as they do with
        ``task.standardise=false``."""
        if self.cfg.data.agent_root is not None or not self.cfg.task.standardise:
            return None, None
        return channel_stats(self._shared_splits()["train"].images)

    def _episodes(self, data: FolderImages, classes, rotations: bool) -> FewShotEpisodes:
        t = self.cfg.task
        mean, std = self._stats
        return FewShotEpisodes(data.images, classes, t.n_way, t.k_shot, t.q_query, rotations, mean=mean, std=std,
                               counts=data.counts)

    # -- the protocol ------------------------------------------------------------------------------------------
    def build_model(self) -> Conv4:
        t = self.cfg.task
        return Conv4(t.channels, t.n_way, self.cfg.model.filters, t.image_size)

    def sampler(self, agent: int, num_agents: int) -> FewShotEpisodes:
        t = self.cfg.task
        train = self._training(agent)
        classes = share_classes(range(len(train.classes)), t.sharing, agent, num_agents)
        try:
            return self._episodes(train, classes, t.rotations)
        except ValueError as err:
            raise ValueError(f"agent {agent} (task.sharing={t.sharing}): {err}") from None

    def eval_set(self, seed: int, num_tasks: int) -> EpisodeSet:
        test = self._test()
        try:
            episodes = self._episodes(test, list(range(len(test.classes))), False)
        except ValueError as err:
            raise ValueError(f"test classes: {err}") from None
        return episodes.episode_set(seeding.generator(seed, seeding.Stream.EVAL), num_tasks)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel pixel mean and standard deviation of uint8 ``[images, C, H, W]`` images, on [0, 1]."""
    pixels = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1).clamp_min(1e-6).tolist()
