"""Omniglot on disk -> one cached tensor file -> N-way K-shot episodes.

Reads torchvision's on-disk layout directly (``ROOT/omniglot-py/images_background|images_evaluation/<alphabet>/
<character>/*.png``), so it also works on a copy without the original zip files, which torchvision's own
``Omniglot`` class insists on. PNGs are decoded once into ``ROOT/omniglot-py/cache-<size>.pt`` (uint8, one row
per character); a run never decodes images per step.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import seeding
from ..config import Config
from ..maml import TaskBatch
from ..models import Conv4

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
DRAWINGS_PER_CHARACTER = 20


@dataclass(frozen=True)
class OmniglotImages:
    """All characters as ``images[c, d]`` (uint8, ``size`` x ``size``), with their alphabet and name."""

    images: torch.Tensor  #: [characters, drawings, size, size], uint8, 255 = ink
    alphabets: tuple[str, ...]  #: alphabet of each character (``background/<name>`` or ``evaluation/<name>``)
    characters: tuple[str, ...]  #: folder name of each character

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]


def character_folders(root: Path) -> list[tuple[str, Path]]:
    """``(alphabet, folder)`` of every character, in a fixed order. Raises ``ValueError`` naming what is missing."""
    base = Path(root) / "omniglot-py"
    out = []
    for part in (BACKGROUND, EVALUATION):
        top = base / part
        if not top.is_dir():
            raise ValueError(f"Omniglot not found: {top} is missing; extract omniglot-py.tar.gz into {root} "
                             f"(torchvision's layout: {base}/{BACKGROUND}/<alphabet>/<character>/*.png)")
        for alphabet in sorted(p for p in top.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                out.append((f"{part.removeprefix('images_')}/{alphabet.name}", char))
    if not out:
        raise ValueError(f"no character folders under {base}")
    return out


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L").resize((size, size), Image.LANCZOS)
            return 255 - np.asarray(img, dtype=np.uint8)  # ink = 255 on a 0 background
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode Omniglot image {path}: {err}; delete or replace the file") from None


def build_cache(root: Path, size: int = 28, progress: bool = True) -> Path:
    """Decode every PNG once into ``cache-<size>.pt`` (atomically) and return its path."""
    root = Path(root)
    folders = character_folders(root)
    images = np.zeros((len(folders), DRAWINGS_PER_CHARACTER, size, size), dtype=np.uint8)
    for c, (_, folder) in enumerate(folders):
        files = sorted(folder.glob("*.png"))
        if len(files) != DRAWINGS_PER_CHARACTER:
            raise ValueError(f"Omniglot class folder {folder} holds {len(files)} PNG images, expected "
                             f"{DRAWINGS_PER_CHARACTER}")
        for d, f in enumerate(files):
            images[c, d] = _decode(f, size)
        if progress and (c % 50 == 0 or c == len(folders) - 1):
            done = (c + 1) / len(folders)
            print(f"\rdecoding Omniglot [{'#' * int(30 * done):<30}] {c + 1}/{len(folders)} characters",
                  end="" if c < len(folders) - 1 else "\n", file=sys.stderr, flush=True)
    path = root / "omniglot-py" / f"cache-{size}.pt"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"images": torch.from_numpy(images), "alphabets": [a for a, _ in folders],
                "characters": [f.name for _, f in folders]}, tmp)
    os.replace(tmp, path)
    return path


def load_omniglot(root: Path, size: int = 28, progress: bool = True) -> OmniglotImages:
    """The cached images (built on first use)."""
    path = Path(root) / "omniglot-py" / f"cache-{size}.pt"
    if not path.is_file():
        build_cache(root, size, progress)
    data = torch.load(path, weights_only=True)
    return OmniglotImages(data["images"], tuple(data["alphabets"]), tuple(data["characters"]))


def split_classes(num_classes: int, seed: int) -> dict[str, list[int]]:
    """A seeded split of character ids into train / val / test: the usual 1100 / 100 / 423 for Omniglot's 1623,
    the same fractions for other sizes."""
    train, val = round(num_classes * 1100 / 1623), round(num_classes * 100 / 1623)
    if train < 1 or train + val >= num_classes:
        raise ValueError(f"cannot split {num_classes} characters into train, validation and test sets")
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    return {"train": sorted(order[:train]), "val": sorted(order[train:train + val]),
            "test": sorted(order[train + val:])}


class FewShotEpisodes:
    """N-way K-shot episodes with Q queries per class from ``images[classes]``.

    With ``rotations``, each character under each of the rotations 0/90/180/270 degrees is its own class
    (4x the classes), as in MAML's Omniglot training set.
    """

    def __init__(self, images: torch.Tensor, classes: list[int], n_way: int, k_shot: int, q_query: int,
                 rotations: bool = False):
        self.images, self.n_way, self.k_shot, self.q_query = images, n_way, k_shot, q_query
        self.classes = [(c, r) for c in classes for r in (range(4) if rotations else (0,))]
        if n_way > len(self.classes):
            raise ValueError(f"{n_way}-way episodes need {n_way} classes, but only {len(self.classes)} are available")
        if k_shot + q_query > images.shape[1]:
            raise ValueError(f"{k_shot} shots + {q_query} queries per class exceed the {images.shape[1]} "
                             f"drawings of a character")

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        per_class = self.k_shot + self.q_query
        xs, xq = [], []
        for _ in range(num_tasks):
            picks = torch.randperm(len(self.classes), generator=gen)[:self.n_way].tolist()
            support, query = [], []
            for idx in picks:
                c, rot = self.classes[idx]
                draws = torch.randperm(self.images.shape[1], generator=gen)[:per_class]
                imgs = torch.rot90(self.images[c, draws], rot, dims=(-2, -1))
                support.append(imgs[:self.k_shot])
                query.append(imgs[self.k_shot:])
            xs.append(torch.stack(support))  # [way, shot, H, W]
            xq.append(torch.stack(query))
        h, w = self.images.shape[-2:]

        def as_batch(x: list[torch.Tensor], per: int) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.stack(x).reshape(num_tasks, self.n_way * per, 1, h, w).float() / 255.0
            labels = torch.arange(self.n_way).repeat_interleave(per).expand(num_tasks, -1).clone()
            return images, labels

        return TaskBatch(*as_batch(xs, self.k_shot), *as_batch(xq, self.q_query))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def agent_classes(data: OmniglotImages, train: list[int], sharing: str, agent: int, num_agents: int) -> list[int]:
    """The training characters agent ``agent`` samples from: all of them (``same``), a seeded-order share
    (``disjoint_classes``), or the characters of whole alphabets dealt out in turn (``alphabets``)."""
    if sharing == "same":
        return train
    if sharing == "disjoint_classes":
        return sorted(np.array_split(np.array(train), num_agents)[agent].tolist())
    if sharing == "alphabets":
        names = sorted({data.alphabets[c] for c in train})
        if len(names) < num_agents:
            raise ValueError(f"task.sharing=alphabets: {len(names)} alphabets cannot be shared by {num_agents} agents")
        mine = set(names[agent::num_agents])
        return [c for c in train if data.alphabets[c] in mine]
    raise ValueError(f"unknown task.sharing {sharing!r}")


class OmniglotFamily:
    """Omniglot N-way K-shot classification with a Conv4 (64 filters) under cross-entropy; accuracy reported."""

    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)
    eval_chunk = 8  #: a 5-way task's 75 query images through Conv4 take ~15 MB per layer: adapt 8 tasks at once

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.task
        self.data = load_omniglot(Path(cfg.data.root), t.image_size)
        self.split = split_classes(self.data.num_classes, t.split_seed)

    def build_model(self) -> Conv4:
        t = self.cfg.task
        return Conv4(1, t.n_way, self.cfg.model.filters, t.image_size)

    def sampler(self, agent: int, num_agents: int) -> FewShotEpisodes:
        t = self.cfg.task
        classes = agent_classes(self.data, self.split["train"], t.sharing, agent, num_agents)
        try:
            return FewShotEpisodes(self.data.images, classes, t.n_way, t.k_shot, t.q_query, t.rotations)
        except ValueError as err:
            raise ValueError(f"agent {agent} (task.sharing={t.sharing}): {err}") from None

    def eval_set(self, seed: int, num_tasks: int) -> TaskBatch:
        t = self.cfg.task
        test = FewShotEpisodes(self.data.images, self.split["test"], t.n_way, t.k_shot, t.q_query, rotations=False)
        return test.sample(seeding.generator(seed, seeding.EVAL), num_tasks)
