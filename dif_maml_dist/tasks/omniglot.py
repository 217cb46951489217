"""Omniglot on disk -> one cached tensor file -> N-way K-shot episodes.

Reads torchvision's on-disk layout directly (``ROOT/omniglot-py/images_background|images_evaluation/<alphabet>/
<character>/*.png``), so it also works on a copy without the original zip files, which torchvision's own
``Omniglot`` class insists on. PNGs are decoded once into a cache file in ``data.cache_dir`` (uint8, one row per
character; see :mod:`dif_maml_dist.tasks.cache`), so a run never decodes images per step and the dataset folder
may be read-only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import Config, TaskConfig
from dif_maml_dist.learning.models import Conv4
from dif_maml_dist.tasks.cache import exclusive, load_cached, source_fingerprint
from dif_maml_dist.tasks.episodes import EpisodeSet, FewShotEpisodes, accuracy, share_classes
from dif_maml_dist.tasks.images import decode

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
                             f"(torchvision's layout: {base}/{BACKGROUND}/<alphabet>/<character>/*.png), or add "
                             f"data.download=true to fetch it through torchvision")
        for alphabet in sorted(p for p in top.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                out.append((f"{part.removeprefix('images_')}/{alphabet.name}", char))
    if not out:
        raise ValueError(f"no character folders under {base}")
    return out


def _decode(path: Path, size: int) -> np.ndarray:
    """One drawing, ``size`` x ``size``, ink = 255 on a 0 background."""
    return decode(path, 1, size, invert=True)[0]


def decode_all(root: Path, size: int = 28, progress: bool = True) -> dict:
    """Every character's drawings decoded to ``size`` x ``size``: the contents of the cache file."""
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
    return {"images": torch.from_numpy(images), "alphabets": [a for a, _ in folders],
            "characters": [f.name for _, f in folders]}


def download_omniglot(root: Path) -> None:
    """Fetch both halves of Omniglot into ``root`` through torchvision (needs internet), unless already there."""
    root = Path(root)
    if all((root / "omniglot-py" / part).is_dir() for part in (BACKGROUND, EVALUATION)):
        return  # nothing to fetch: no lock either, so that a read-only dataset folder serves with download=true
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / "omniglot-py.download.lock"):
        for background, part in ((True, BACKGROUND), (False, EVALUATION)):
            if (root / "omniglot-py" / part).is_dir():
                continue
            try:
                from torchvision.datasets import Omniglot
            except ImportError:
                raise ValueError("data.download=true needs torchvision: pip install "
                                 "'dif_maml_dist[download]'") from None
            try:
                Omniglot(str(root), background=background, download=True)
            except Exception as err:  # noqa: BLE001 (network and archive errors come in many types)
                raise ValueError(f"could not download Omniglot ({part}) through torchvision into {root}: {err}; "
                                 f"without internet, extract omniglot-py.tar.gz into {root} instead") from None


def _fingerprint(root: Path, size: int) -> Optional[str]:
    """Of the PNGs the cache is decoded from; ``None`` when the folders are gone (the cache is all there is)."""
    base = Path(root) / "omniglot-py"
    if not all((base / part).is_dir() for part in (BACKGROUND, EVALUATION)):
        return None
    files = [f for _, folder in character_folders(root) for f in sorted(folder.glob("*.png"))]
    return source_fingerprint(root, files, dataset="omniglot", size=size)


def load_omniglot(root: Path, size: int = 28, progress: bool = True, download: bool = False,
                  cache_dir: Optional[str | Path] = None) -> OmniglotImages:
    """The images, from a cache in ``cache_dir`` (decoded and written there on first use; with ``download``,
    fetched through torchvision into ``root`` first if the folders are missing). A ``root`` that holds only
    ``omniglot-py/cache-<size>.pt`` (as earlier versions wrote it there) is read from that file."""
    root = Path(root)
    legacy = root / "omniglot-py" / f"cache-{size}.pt"
    if download and not legacy.is_file():
        download_omniglot(root)
    fingerprint = _fingerprint(root, size)
    if fingerprint is None and not legacy.is_file():
        character_folders(root)  # says which folder is missing
    data = load_cached(cache_dir, f"omniglot-{size}", lambda: decode_all(root, size, progress), fingerprint, legacy)
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


def background_evaluation_split(alphabets: Sequence[str], val_alphabets: int, seed: int) -> dict[str, list[int]]:
    """Lake et al.'s protocol: train on the background alphabets, less ``val_alphabets`` of them (drawn with
    ``seed``) held out for validation; test on the evaluation alphabets. ``alphabets``: each character's."""
    background = sorted({a for a in alphabets if a.startswith("background/")})
    if not background or len(background) == len(set(alphabets)):
        half = EVALUATION if background else BACKGROUND
        raise ValueError(f"task.split=background_evaluation needs both halves of Omniglot, but {half} holds no "
                         f"characters: extract the whole dataset, or use task.split=random")
    if val_alphabets >= len(background):
        raise ValueError(f"task.val_alphabets={val_alphabets} leaves no background alphabet to train on (there are "
                         f"{len(background)}): use fewer")
    order = np.random.default_rng(seed).permutation(len(background)).tolist()
    held_out = {background[i] for i in order[:val_alphabets]}
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c, alphabet in enumerate(alphabets):
        part = "test" if not alphabet.startswith("background/") else "val" if alphabet in held_out else "train"
        split[part].append(c)
    return split


def character_split(alphabets: Sequence[str], t: TaskConfig) -> dict[str, list[int]]:
    """The train / val / test character ids of ``task.split`` (``alphabets``: each character's, in
    :func:`character_folders` order)."""
    if t.split == "background_evaluation":
        return background_evaluation_split(alphabets, t.val_alphabets, t.split_seed)
    return split_classes(len(alphabets), t.split_seed)


def agent_classes(data: OmniglotImages, train: list[int], sharing: str, agent: int, num_agents: int) -> list[int]:
    """The training characters agent ``agent`` samples from: all of them (``same``), their share of a fixed
    partition (``disjoint_classes``), or the characters of whole alphabets dealt out in turn (``alphabets``)."""
    if sharing == "alphabets":
        names = sorted({data.alphabets[c] for c in train})
        if len(names) < num_agents:
            raise ValueError(f"task.sharing=alphabets: {len(names)} alphabets cannot be shared by {num_agents} agents")
        mine = set(names[agent::num_agents])
        return [c for c in train if data.alphabets[c] in mine]
    return share_classes(train, sharing, agent, num_agents)


class OmniglotFamily:
    """Omniglot N-way K-shot classification with a Conv4 (64 filters) under cross-entropy; accuracy reported."""

    reads_agent_data = False  #: one shared dataset (data.root); data.agent_root is refused
    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)
    #: test tasks adapted at once: bounds memory (a 20-way task with 15 queries per class is 320 images, ~64 MB of
    #: first-layer activations in float32)
    eval_chunk = 8

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.task
        self.data = load_omniglot(Path(cfg.data.root), t.image_size, download=cfg.data.download,
                                  cache_dir=cfg.data.cache_dir)
        self.split = character_split(self.data.alphabets, t)

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

    def image(self, path: Path) -> torch.Tensor:
        """A user's image as this family's episodes hold theirs: decoded like the dataset (grayscale, resized, ink
        bright on dark), scaled to [0, 1], ``[1, H, W]``."""
        return torch.from_numpy(decode(Path(path), 1, self.cfg.task.image_size, invert=True)).float().div(255.0)

    def eval_set(self, seed: int, num_tasks: int) -> EpisodeSet:
        t = self.cfg.task
        test = FewShotEpisodes(self.data.images, self.split["test"], t.n_way, t.k_shot, t.q_query, rotations=False)
        return test.episode_set(seeding.generator(seed, seeding.Stream.EVAL), num_tasks)

    def val_set(self, seed: int, num_tasks: int) -> EpisodeSet:
        """Validation tasks from the validation characters (model selection; never trained or tested on)."""
        t = self.cfg.task
        try:
            val = FewShotEpisodes(self.data.images, self.split["val"], t.n_way, t.k_shot, t.q_query, rotations=False)
        except ValueError as err:
            raise ValueError(f"train.validate=true: the validation characters cannot make episodes: {err}") from None
        return val.episode_set(seeding.generator(seed, seeding.Stream.VALIDATION), num_tasks)
