"""N-way K-shot episodes from a class-indexed image tensor, shared by Omniglot, MiniImagenet and image folders.

Images are stored as uint8 ``[classes, images_per_class, H, W]`` (grayscale) or ``[classes, images_per_class,
3, H, W]`` (RGB) when every class holds as many, or one after another with each class's count when classes differ
(an image folder's), and only turned into floats for the few images an episode draws.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from dif_maml_dist.learning.batch import TaskBatch

SHARING_MODES = ("same", "disjoint_classes")  #: every dataset; Omniglot adds "alphabets"


class FewShotEpisodes:
    """N-way K-shot episodes with Q queries per class, drawn from ``images[classes]``.

    ``images`` is ``[classes, n, (C,) H, W]`` when every class holds n images or, with ``counts``, ``[images, (C,)
    H, W]``: the ``counts[c]`` images of class c after those of the classes before it (classes of different sizes,
    every image kept). An episode draws each class's images among its own count only.

    With ``rotations``, each class under each of the rotations 0/90/180/270 degrees is its own class (4x the
    classes), as in MAML's Omniglot training set. Pixels are scaled to [0, 1], then, if ``mean``/``std`` are given
    (one value per channel), standardised per channel.
    """

    def __init__(self, images: torch.Tensor, classes: Sequence[int], n_way: int, k_shot: int, q_query: int,
                 rotations: bool = False, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, counts: Optional[Sequence[int]] = None):
        if counts is None:
            if images.dim() not in (4, 5):
                raise ValueError(f"images must be [classes, n, H, W] or [classes, n, C, H, W], got "
                                 f"{tuple(images.shape)}")
            counts, images = [images.shape[1]] * images.shape[0], images.flatten(0, 1)
        elif images.dim() not in (3, 4) or sum(counts) != images.shape[0]:
            raise ValueError(f"images with per-class counts must be [images, H, W] or [images, C, H, W] with "
                             f"sum(counts) = {sum(counts)} images, got {tuple(images.shape)}")
        self.images, self.n_way, self.k_shot, self.q_query = images, n_way, k_shot, q_query
        self.counts = [int(n) for n in counts]
        self.offsets = torch.tensor([0, *self.counts[:-1]], dtype=torch.long).cumsum(0)
        self.classes = [(c, r) for c in classes for r in (range(4) if rotations else (0,))]
        if n_way > len(self.classes):
            raise ValueError(f"{n_way}-way episodes need {n_way} classes, but only {len(self.classes)} are available; "
                             f"lower task.n_way")
        smallest = min(classes, key=lambda c: self.counts[c])
        if k_shot + q_query > self.counts[smallest]:
            raise ValueError(f"{k_shot} shots + {q_query} queries per class exceed the {self.counts[smallest]} images "
                             f"of class {smallest}; lower task.k_shot or task.q_query")
        self.item_shape = (1, *images.shape[1:]) if images.dim() == 3 else tuple(images.shape[1:])
        channels = self.item_shape[0]
        if (mean is None) != (std is None) or (mean is not None and (len(mean) != channels or len(std) != channels)):
            raise ValueError(f"mean and std need one value per channel ({channels}), got {mean} and {std}")
        shape = (1, 1, channels, 1, 1)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(shape)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(shape)

    def draw(self, gen: torch.Generator, num_tasks: int) -> torch.Tensor:
        """Which images make up ``num_tasks`` episodes: ``[tasks, way, shot + query, 3]`` integer rows of
        (class, image of that class, quarter turns); the first ``k_shot`` images of each class are its support."""
        per_class = self.k_shot + self.q_query
        picks = torch.empty(num_tasks, self.n_way, per_class, 3, dtype=torch.long)
        for t in range(num_tasks):
            for w, idx in enumerate(torch.randperm(len(self.classes), generator=gen)[:self.n_way].tolist()):
                c, rot = self.classes[idx]
                picks[t, w, :, 0], picks[t, w, :, 2] = c, rot
                picks[t, w, :, 1] = torch.randperm(self.counts[c], generator=gen)[:per_class]
        return picks

    def gather(self, picks: torch.Tensor) -> TaskBatch:
        """The episodes ``picks`` (from :meth:`draw`) as float images, labels 0..way-1 in class order."""
        num_tasks = picks.shape[0]
        # [tasks, way, shot + query, (C,) H, W], uint8
        images = self.images[self.offsets[picks[..., 0]] + picks[..., 1]]
        for quarter in (1, 2, 3):
            turned = picks[..., 2] == quarter
            if turned.any():
                images[turned] = torch.rot90(images[turned], quarter, dims=(-2, -1))
        images = images.reshape(*picks.shape[:3], *self.item_shape).float() / 255.0
        if self.mean is not None:
            images = (images - self.mean.unsqueeze(0)) / self.std.unsqueeze(0)

        def as_batch(x: torch.Tensor, per: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(self.n_way).repeat_interleave(per).expand(num_tasks, -1).clone()
            return x.reshape(num_tasks, self.n_way * per, *self.item_shape), labels

        return TaskBatch(*as_batch(images[:, :, :self.k_shot], self.k_shot),
                         *as_batch(images[:, :, self.k_shot:], self.q_query))

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        return self.gather(self.draw(gen, num_tasks))

    def episode_set(self, gen: torch.Generator, num_tasks: int) -> "EpisodeSet":
        """A fixed test set of ``num_tasks`` episodes, held as indices (see :class:`EpisodeSet`)."""
        return EpisodeSet(self, self.draw(gen, num_tasks))


class EpisodeSet:
    """A fixed list of episodes held as image indices and turned into float images a slice at a time.

    A test set of 600 MiniImagenet 5-way 1-shot tasks with 10 queries per class is 2.8 GB of float32 images per
    process if built at once; as indices it is a few hundred kilobytes, and evaluation gathers one chunk of tasks
    at a time. ``slice(i, j)`` returns a :class:`TaskBatch`, like ``TaskBatch.slice``.
    """

    def __init__(self, episodes: FewShotEpisodes, picks: torch.Tensor):
        self.episodes, self.picks = episodes, picks

    def __len__(self) -> int:
        return self.picks.shape[0]

    def slice(self, start: int, stop: int) -> TaskBatch:
        return self.episodes.gather(self.picks[start:stop])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def share_classes(train: Sequence[int], sharing: str, agent: int, num_agents: int) -> list[int]:
    """The training classes agent ``agent`` samples from: all of them (``same``) or its share of a fixed
    partition (``disjoint_classes``: ``train`` cut into ``num_agents`` nearly equal consecutive parts)."""
    if sharing == "same":
        return list(train)
    if sharing == "disjoint_classes":
        return sorted(np.array_split(np.array(train, dtype=np.int64), num_agents)[agent].tolist())
    raise ValueError(f"task.sharing={sharing} is not available here; choose one of: {', '.join(SHARING_MODES)}")
