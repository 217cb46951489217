"""Few-shot tasks from any dataset in the class-folder layout (``ROOT/<class>/<image>``, as torchvision's
``ImageFolder`` reads it): N-way K-shot episodes with Q queries per class.

Classes come split by folders (``ROOT/train/<class>/``, ``ROOT/val/<class>/``, ``ROOT/test/<class>/``) or, when
``ROOT`` holds class folders directly, drawn into train / validation / test with ``task.split_seed``. Each agent
reads its training classes from its own folder (``data.agent_root``) or from the shared ``data.root``; the test
classes come from ``data.test_root`` (a folder every node holds), the shared root's test split, or, with each
agent's own data and no ``data.test_root``, each agent's own test split (``held_out_set``). Images are read with
PIL, composited onto white when transparent, converted to grayscale or RGB (``task.channels``), resized to
``task.image_size`` and, with ``task.invert``, inverted; with shared data, pixels are standardised with the training
classes' channel statistics only (``task.standardise``). Classes may hold different numbers of images: every image
is kept, and an episode draws a class's images among its own. Every folder is decoded once into a cache file in
``data.cache_dir`` (see :mod:`dif_maml_dist.tasks.cache`), so a dataset moved or mounted elsewhere, or read-only, is
found again.
"""

from __future__ import annotations

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
from dif_maml_dist.tasks.cache import load_cached, source_fingerprint
from dif_maml_dist.tasks.custom import agent_root
from dif_maml_dist.tasks.episodes import EpisodeSet, FewShotEpisodes, accuracy, share_classes
from dif_maml_dist.tasks.images import decode

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


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root``, sorted (``ValueError`` naming ``root`` when it holds none)."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    return folders


def _images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_folder(root: Path, channels: int, size: int, invert: bool, need: int,
                cache_dir: Optional[str | Path]) -> FolderImages:
    """Every image of every class folder of ``root`` decoded (from the cache when it holds them); a class with
    fewer than ``need`` images is a ``ValueError`` naming it."""
    root = Path(root)
    folders = class_folders(root)
    files = {f: _images_of(f) for f in folders}
    short = [f for f, images in files.items() if len(images) < need]
    if short:
        raise ValueError(f"class folder {short[0]} holds {len(files[short[0]])} images, fewer than the {need} an "
                         f"episode takes from a class (task.k_shot + task.q_query)")
    key = source_fingerprint(root, [f for images in files.values() for f in images], dataset="image_folder",
                             channels=channels, size=size, invert=invert)

    def build() -> dict:
        images = np.zeros((sum(map(len, files.values())), channels, size, size), dtype=np.uint8)
        for i, f in enumerate(f for folder in folders for f in files[folder]):
            images[i] = decode(f, channels, size, invert)
        return {"images": torch.from_numpy(images), "counts": [len(files[folder]) for folder in folders],
                "classes": [f.name for f in folders]}

    data = load_cached(cache_dir, f"image_folder-{size}", build, key)
    return FolderImages(data["images"], tuple(data["counts"]), tuple(data["classes"]))


def drawn_split(num_classes: int, seed: int, val_fraction: float = VAL_FRACTION) -> dict[str, list[int]]:
    """Class indices drawn into train / val / test with ``seed`` (at least one training and one test class; the
    table family splits its files with it, without validation)."""
    test, val = max(1, round(num_classes * TEST_FRACTION)), round(num_classes * val_fraction)
    if num_classes - test - val < 1:
        raise ValueError(f"cannot split {num_classes} classes into train, validation and test sets: add classes, or "
                         f"give the split as folders ROOT/train/<class>/ and ROOT/test/<class>/")
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    return {"test": sorted(order[:test]), "val": sorted(order[test:test + val]), "train": sorted(order[test + val:])}


class ImageFolderFamily:
    """Few-shot classification on class folders, with a Conv4 (``model.filters``) under cross-entropy; accuracy."""

    reads_agent_data = True  #: each agent's own class folders (data.agent_root), or shared ones
    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)
    eval_chunk = 4  #: test tasks adapted at once: bounds memory

    def __init__(self, cfg: Config):
        self.cfg, self.need = cfg, cfg.task.k_shot + cfg.task.q_query
        if cfg.data.agent_root is None and cfg.data.root is None:
            raise ValueError("task=image_folder needs data: data.root=DIR (shared) or data.agent_root=DIR (each "
                             "agent's own; {agent} becomes the agent's id)")
        self._splits: dict[Path, dict[str, FolderImages]] = {}

    # -- where the classes are ------------------------------------------------------------------------------------
    def _folder(self, root: Path) -> FolderImages:
        t = self.cfg.task
        return load_folder(root, t.channels, t.image_size, t.invert, self.need, self.cfg.data.cache_dir)

    def _split(self, root: Path) -> dict[str, FolderImages]:
        """``root``'s classes by split: its split folders, or its class folders split with ``task.split_seed``
        (loaded once per process)."""
        if root not in self._splits:
            if (root / "train").is_dir():
                self._splits[root] = {s: self._folder(root / s) for s in SPLIT_FOLDERS if (root / s).is_dir()}
            else:
                every = self._folder(root)
                split = drawn_split(len(every.classes), self.cfg.task.split_seed)
                self._splits[root] = {s: every.select(idx) for s, idx in split.items() if idx}
        return self._splits[root]

    def _training(self, agent: int) -> FolderImages:
        if self.cfg.data.agent_root is None:
            return self._split(Path(self.cfg.data.root))["train"]
        root = agent_root(self.cfg.data, agent)
        if self.cfg.data.test_root is None:  # some of the agent's own classes are held out to test it on
            return self._split(root)["train"]
        return self._folder(root / "train" if (root / "train").is_dir() else root)

    def _test(self, root: Path) -> FolderImages:
        """The test classes of the shared ``data.root`` or an agent's own folder."""
        splits = self._split(root)
        if "test" not in splits:
            raise ValueError(f"{root} has a train/ folder but no test/ folder: add {root}/test/<class>/, or set "
                             f"data.test_root=DIR")
        return splits["test"]

    @cached_property
    def _stats(self) -> tuple[Optional[list[float]], Optional[list[float]]]:
        """The channel statistics pixels are standardised with: the shared training classes'. With each agent's own
        data no statistics are common to all agents without exchanging them, so pixels stay on [0, 1] (the Conv4's
        first batch norm standardises its input's features per task anyway), as they do with
        ``task.standardise=false``."""
        if self.cfg.data.agent_root is not None or not self.cfg.task.standardise:
            return None, None
        return channel_stats(self._split(Path(self.cfg.data.root))["train"].images)

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
        if self.cfg.data.test_root is not None:
            test = self._folder(Path(self.cfg.data.test_root))
        elif self.cfg.data.root is not None:
            test = self._test(Path(self.cfg.data.root))
        else:
            raise ValueError("task=image_folder with data.agent_root tests each agent on its own held-out classes; "
                             "a test set shared by all needs data.test_root=DIR")
        return self._test_episodes(test, seeding.generator(seed, seeding.Stream.EVAL), num_tasks)

    def held_out_set(self, agent: int, num_agents: int, seed: int, num_tasks: int) -> EpisodeSet:
        """Episodes of agent ``agent``'s own test classes (its ``test/`` folder, or its classes drawn with
        ``task.split_seed``), which its training never sees."""
        test = self._test(agent_root(self.cfg.data, agent))
        return self._test_episodes(test, seeding.generator(seed, seeding.Stream.EVAL, agent), num_tasks)

    def image(self, path: Path) -> torch.Tensor:
        """A user's image (``evaluate --episodes``) as this family's episodes hold theirs: decoded as the run
        decodes its folders, scaled to [0, 1] and standardised as they are, ``[channels, H, W]``."""
        t = self.cfg.task
        x = torch.from_numpy(decode(Path(path), t.channels, t.image_size, t.invert)).float().div(255.0)
        mean, std = self._stats
        return x if mean is None else (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)

    def _test_episodes(self, test: FolderImages, gen: torch.Generator, num_tasks: int) -> EpisodeSet:
        try:
            episodes = self._episodes(test, list(range(len(test.classes))), False)
        except ValueError as err:
            raise ValueError(f"test classes: {err}") from None
        return episodes.episode_set(gen, num_tasks)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel pixel mean and standard deviation of uint8 ``[images, C, H, W]`` images, on [0, 1]."""
    pixels = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1).clamp_min(1e-6).tolist()
