"""A user's own few-shot episodes from a folder, as task batches of the run's task family.

Classification: ``DIR/<episode>/support/<class>/<image>`` and ``DIR/<episode>/query/<class>/<image>``, any image
format PIL reads; an episode's class folders, in sorted order, are its labels 0..N-1, and every image is converted
by the task family exactly as it converts its own (``family.image``). Regression (sinusoid): ``DIR/<episode>.csv``
with a header ``split,x,y`` and rows whose split is ``support`` or ``query`` and whose x and y are finite numbers
(UTF-8, with or without a byte-order mark). A family with an ``episode(path)`` member (tables) reads each
``DIR/<episode>.csv`` itself.

Every mistake is a ``ValueError`` naming the file or folder.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from dif_maml_dist.learning.batch import TaskBatch


def read_episodes(root: Path, family, n_way: int | None) -> dict[str, TaskBatch]:
    """Each episode under ``root`` as a one-task batch, by episode name (sorted). ``n_way``: the classes a
    classification model's head has (None for regression)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"episodes folder {root} does not exist")
    episode = getattr(family, "episode", None)
    if episode is not None:
        files = sorted(p for p in root.glob("*.csv") if p.is_file())
        if not files:
            raise ValueError(f"{root} holds no episodes: expected <episode>.csv files with a column split (support "
                             f"or query) and the run's feature and target columns")
        return {p.stem: episode(p) for p in files}
    if n_way is None:
        files = sorted(p for p in root.glob("*.csv") if p.is_file())
        if not files:
            raise ValueError(f"{root} holds no episodes: expected <episode>.csv files with columns split,x,y")
        return {p.stem: _regression_episode(p) for p in files}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} holds no episodes: expected <episode>/support/<class>/ and <episode>/query/<class>/")
    return {p.name: _classification_episode(p, family, n_way) for p in folders}


def _classes(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: an episode needs support/<class>/ and query/<class>/ folders")
    classes = {}
    for c in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in c.iterdir() if p.is_file() and not p.name.startswith("."))
        if not images:
            raise ValueError(f"class folder {c} is empty: give it at least one image")
        classes[c.name] = images
    return classes


def _classification_episode(episode: Path, family, n_way: int) -> TaskBatch:
    support, query = _classes(episode / "support"), _classes(episode / "query")
    if not query:
        raise ValueError(f"episode {episode} has no query images: give query/<class>/ folders with images of the "
                         f"support classes")
    if len(support) != n_way:
        raise ValueError(f"episode {episode} has {len(support)} support classes but the model has {n_way} outputs "
                         f"(an {n_way}-way model): give it {n_way} class folders")
    missing = sorted(set(query) - set(support))
    if missing:
        raise ValueError(f"episode {episode}: query class {missing[0]!r} has no support folder (query classes must "
                         f"be among the support classes)")
    labels = {name: i for i, name in enumerate(support)}

    def tensors(classes: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, ys = [], []
        for name, paths in classes.items():
            for path in paths:
                images.append(family.image(path))
                ys.append(labels[name])
        return torch.stack(images), torch.tensor(ys)

    xs, ys = tensors(support)
    xq, yq = tensors(query)
    return TaskBatch(xs[None], ys[None], xq[None], yq[None])


def _regression_episode(path: Path) -> TaskBatch:
    rows: dict[str, list[tuple[float, float]]] = {"support": [], "query": []}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"split", "x", "y"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected a header with columns split,x,y, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                split = (row["split"] or "").strip()
                if split not in rows:
                    raise ValueError(f"{path}:{line}: split must be support or query, got {split!r}")
                try:
                    point = float(row["x"]), float(row["y"])
                    finite = all(map(math.isfinite, point))  # float() takes "nan", "inf" and overflows like 1e400
                except (TypeError, ValueError):
                    finite = False
                if not finite:
                    raise ValueError(f"{path}:{line}: x and y must be finite numbers, got {row['x']!r}, {row['y']!r}")
                rows[split].append(point)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    for split, points in rows.items():
        if not points:
            raise ValueError(f"{path} has no {split} points")
    s, q = torch.tensor(rows["support"]), torch.tensor(rows["query"])
    return TaskBatch(s[None, :, :1], s[None, :, 1:], q[None, :, :1], q[None, :, 1:])
