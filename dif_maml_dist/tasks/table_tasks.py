"""Tasks from tables: one task per CSV file (a sensor site's or a machine's own log), named feature columns and a
target column, support and query rows drawn afresh for every episode.

A file is a header of column names, then one row per example (``tasks.tables`` reads it). The features are
``task.features`` (default: every column of the reference file but the target) and the target is ``task.target``:

- ``task.target_type=regression``: the target is a number; an episode is ``task.num_support`` support rows and
  ``task.num_query`` query rows of one file, drawn without replacement; MSE, no metric. The sinusoid is one such
  family whose tables are drawn from ``A sin(x - phase)`` instead of read: its tasks written to CSV files
  (``x,y``) are served back as the same points (tests/test_table_tasks.py).
- ``task.target_type=classification``: the target is a label (any text); an episode is ``task.n_way`` of one
  file's labels, numbered 0..n_way-1 in the order drawn, with ``task.k_shot`` support and ``task.q_query`` query
  rows of each; cross-entropy, accuracy.

Files are split into training and test tasks by folders (``ROOT/train/*.csv``, ``ROOT/test/*.csv``) or, when
``ROOT`` holds the files directly, drawn with ``task.split_seed`` (a fifth for testing). Each agent reads its
training files from its own folder (``data.agent_root``) or the shared ``data.root``; test files come from
``data.test_root``, the shared root's test split, or, with each agent's own data and no ``data.test_root``, the
agent's own test split (``held_out_set``). With shared data the features are standardised with the training
files' column means and deviations; with each agent's own data no statistics are common to all agents without
exchanging them, so features are used as they are. Tables are small: read once per process, never cached on disk.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import Config
from dif_maml_dist.learning.batch import TaskBatch
from dif_maml_dist.learning.models import MLP
from dif_maml_dist.tasks.custom import agent_root
from dif_maml_dist.tasks.episodes import accuracy, share_classes
from dif_maml_dist.tasks.image_folder import drawn_split
from dif_maml_dist.tasks.tables import LAYOUT, Table, column_stats, csv_files, header, read_table, standardised


def draw_rows(n: int, k: int, gen: torch.Generator) -> np.ndarray:
    """``k`` distinct indices of ``n`` rows, uniformly, from ``gen``: a permutation of few rows; of many, draws of
    ``k`` indices until they are distinct (a permutation of a 100,000-row log costs 10 ms per task, and such a
    draw, with a collision less likely than 1 in 8, microseconds)."""
    if n <= 4 * k * k:
        return torch.randperm(n, generator=gen)[:k].numpy()
    while True:
        rows = torch.randint(n, (k,), generator=gen)
        if len(torch.unique(rows)) == k:
            return rows.numpy()


class RowEpisodes:
    """Regression episodes: a file, then ``support`` + ``query`` of its rows without replacement."""

    criterion = staticmethod(F.mse_loss)
    metric = None  #: regression: the loss is the figure

    def __init__(self, tables: Sequence[Table], support: int, query: int):
        for t in tables:
            if len(t.x) < support + query:
                raise ValueError(f"{t.path} has {len(t.x)} rows, fewer than the {support + query} an episode takes "
                                 f"(task.num_support + task.num_query)")
        self.tables, self.support = list(tables), support
        self.need = support + query

    @classmethod
    def of(cls, tables: Sequence[Table], cfg: Config) -> "RowEpisodes":
        return cls(tables, cfg.task.num_support, cfg.task.num_query)

    @staticmethod
    def outputs(cfg: Config) -> int:
        return 1

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        xs, ys = [], []
        for _ in range(num_tasks):  # task by task from gen: fewer tasks are a prefix of more
            t = self.tables[int(torch.randint(len(self.tables), (1,), generator=gen))]
            rows = draw_rows(len(t.x), self.need, gen)
            xs.append(t.x[rows])
            ys.append(t.y[rows, None])
        x = torch.from_numpy(np.stack(xs)).reshape(num_tasks, self.need, -1)
        y = torch.from_numpy(np.stack(ys)).reshape(num_tasks, self.need, 1)
        s = self.support
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


class ClassEpisodes:
    """Classification episodes: a file, then ``n_way`` of its labels (numbered 0..n_way-1 in the order drawn) and
    ``k_shot`` + ``q_query`` rows of each, without replacement."""

    criterion = staticmethod(F.cross_entropy)
    metric = staticmethod(accuracy)

    def __init__(self, tables: Sequence[Table], n_way: int, k_shot: int, q_query: int):
        need = k_shot + q_query
        self.by_class = []
        for t in tables:
            if len(t.labels) < n_way:
                raise ValueError(f"{t.path} has {len(t.labels)} label{'' if len(t.labels) == 1 else 's'}, fewer "
                                 f"than the {n_way} classes of an episode (task.n_way)")
            rows = [np.flatnonzero(t.y == c) for c in range(len(t.labels))]
            short = [c for c, r in enumerate(rows) if len(r) < need]
            if short:
                n = len(rows[short[0]])
                raise ValueError(f"{t.path}: class {t.labels[short[0]]!r} has {n} row{'' if n == 1 else 's'}, fewer "
                                 f"than the {need} an episode takes from a class (task.k_shot + task.q_query)")
            self.by_class.append(rows)
        self.tables, self.n_way, self.k_shot, self.need = list(tables), n_way, k_shot, need

    @classmethod
    def of(cls, tables: Sequence[Table], cfg: Config) -> "ClassEpisodes":
        t = cfg.task
        return cls(tables, t.n_way, t.k_shot, t.q_query)

    @staticmethod
    def outputs(cfg: Config) -> int:
        return cfg.task.n_way

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        xs = []
        for _ in range(num_tasks):  # task by task from gen: fewer tasks are a prefix of more
            i = int(torch.randint(len(self.tables), (1,), generator=gen))
            by_class = self.by_class[i]
            classes = torch.randperm(len(by_class), generator=gen)[:self.n_way].tolist()
            rows = [by_class[c][draw_rows(len(by_class[c]), self.need, gen)] for c in classes]
            xs.append(self.tables[i].x[np.stack(rows)])  # [way, shot + query, features]
        x = torch.from_numpy(np.stack(xs))  # [tasks, way, shot + query, features]
        k = self.k_shot

        def as_batch(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            per = part.shape[2]
            labels = torch.arange(self.n_way).repeat_interleave(per).expand(num_tasks, -1).clone()
            return part.reshape(num_tasks, self.n_way * per, -1), labels

        return TaskBatch(*as_batch(x[:, :, :k]), *as_batch(x[:, :, k:]))


#: task.target_type -> how its episodes are drawn, with their criterion, metric and model outputs
TARGET_TYPES = {"regression": RowEpisodes, "classification": ClassEpisodes}


class TableFamily:
    """Tasks from CSV files, with an MLP (features -> ``model.hidden`` -> 1 or ``task.n_way``)."""

    reads_agent_data = True  #: each agent's own files (data.agent_root), or shared ones
    eval_chunk = 1000

    def __init__(self, cfg: Config):
        t, d = cfg.task, cfg.data
        self.cfg, self.episodes = cfg, TARGET_TYPES[t.target_type]
        self._tables: dict[Path, list[Table]] = {}
        self.criterion, self.metric = self.episodes.criterion, self.episodes.metric
        if d.agent_root is None and d.root is None:
            raise ValueError("task=table_tasks needs data: data.root=DIR (shared) or data.agent_root=DIR (each "
                             "agent's own; {agent} becomes the agent's id)")
        if d.agent_root is not None and d.test_root is None and t.features is None:
            raise ValueError("task=table_tasks with data.agent_root and no data.test_root needs the feature columns "
                             "named, task.features=[a,b,...]: no file is common to all agents to read them from")
        for key in ("test_root",) if d.agent_root is not None else ("root", "test_root"):
            folder = getattr(d, key)
            if folder is not None and not Path(folder).is_dir():
                what = "is not a folder" if Path(folder).exists() else "does not exist"
                raise ValueError(f"data.{key}={folder} {what} (a folder of CSV files, {LAYOUT})")
        # The columns, fixed before any agent reads its files: every process takes them from the same file (the
        # test folder every node holds, or the shared root), so all agents' models agree on them.
        if t.features is None:
            reference = csv_files(Path(d.test_root) if d.agent_root is not None else self._train_folder())[0]
            names = header(reference)
            if t.target not in names:
                raise ValueError(f"{reference} has no column {t.target!r} (task.target); its columns are: "
                                 f"{', '.join(n for n in names if n)}")
            self.features = [c for c in names if c and c != t.target]
            if not self.features:
                raise ValueError(f"{reference} has no feature columns besides the target {t.target!r}")
        else:
            self.features = list(t.features)

    # -- where the tasks are ------------------------------------------------------------------------------------
    def _train_folder(self) -> Path:
        root = Path(self.cfg.data.root)
        return root / "train" if (root / "train").is_dir() else root

    def _read(self, folder: Path) -> list[Table]:
        """``folder``'s tables, read once per process (an agent's serve its sampler, tests and start-up checks)."""
        if folder not in self._tables:
            t = self.cfg.task
            self._tables[folder] = [read_table(p, self.features, t.target, t.target_type == "classification",
                                               t.features is None) for p in csv_files(folder)]
        return self._tables[folder]

    @cached_property
    def _shared_splits(self) -> dict[str, list[Table]]:
        """data.root's tables by split, as read: its train/ and test/ folders; all of it for training when
        data.test_root holds the test tasks; else its files split with ``task.split_seed``."""
        d = self.cfg.data
        root = Path(d.root)
        if (root / "train").is_dir():
            return {s: self._read(root / s) for s in ("train", "test") if (root / s).is_dir()}
        every = self._read(root)
        if d.test_root is not None:
            return {"train": every}
        if len(every) < 2:
            raise ValueError(f"{root} holds one CSV file; a split into training and test tasks needs two or more "
                             f"(one file per task), or give the test tasks as data.test_root=DIR")
        split = drawn_split(len(every), self.cfg.task.split_seed, val_fraction=0.0)
        return {s: [every[i] for i in split[s]] for s in ("train", "test")}

    @cached_property
    def stats(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The features' means and deviations that every table is standardised with: the shared training files'.
        None with each agent's own data: no statistics are common to all agents without exchanging them."""
        return None if self.cfg.data.agent_root is not None else column_stats(self._shared_splits["train"])

    def _standardised(self, tables: list[Table]) -> list[Table]:
        return tables if self.stats is None else standardised(tables, *self.stats)

    @cached_property
    def _train(self) -> list[Table]:
        return self._standardised(self._shared_splits["train"])

    @cached_property
    def _test(self) -> list[Table]:
        d = self.cfg.data
        if d.test_root is not None:
            return self._standardised(self._read(Path(d.test_root)))
        if "test" not in self._shared_splits:
            raise ValueError(f"{d.root} has a train/ folder but no test/ folder: add {d.root}/test/*.csv, or set "
                             f"data.test_root=DIR")
        return self._standardised(self._shared_splits["test"])

    # -- the protocol ------------------------------------------------------------------------------------------
    def build_model(self) -> MLP:
        return MLP(len(self.features), self.cfg.model.hidden, self.episodes.outputs(self.cfg))

    def _own(self, agent: int, split: str) -> list[Table]:
        """Agent ``agent``'s tables of ``split``: its train/ or test/ folder, or its files (all with a shared test
        folder, else split with ``task.split_seed``)."""
        root = agent_root(self.cfg.data, agent)  # this agent's own folder only
        if (root / "train").is_dir():
            if not (root / split).is_dir():
                raise ValueError(f"agent {agent}: {root} has a train/ folder but no {split}/ folder: add "
                                 f"{root}/{split}/*.csv, or set data.test_root=DIR")
            return self._read(root / split)
        every = self._read(root)
        if self.cfg.data.test_root is not None:
            return every
        if len(every) < 2:
            raise ValueError(f"agent {agent}: {root} holds one CSV file; holding some of its tasks out to test it on "
                             f"needs two or more (one file per task), or set data.test_root=DIR")
        return [every[i] for i in drawn_split(len(every), self.cfg.task.split_seed, val_fraction=0.0)[split]]

    def sampler(self, agent: int, num_agents: int):
        if self.cfg.data.agent_root is not None:
            return self.episodes.of(self._own(agent, "train"), self.cfg)
        mine = share_classes(range(len(self._train)), self.cfg.task.sharing, agent, num_agents)
        if not mine:
            raise ValueError(f"agent {agent} has no training files: task.sharing={self.cfg.task.sharing} deals "
                             f"{len(self._train)} files to {num_agents} agents; add files or use task.sharing=same")
        return self.episodes.of([self._train[i] for i in mine], self.cfg)

    def eval_set(self, seed: int, num_tasks: int) -> TaskBatch:
        return self.episodes.of(self._test, self.cfg).sample(seeding.generator(seed, seeding.Stream.EVAL), num_tasks)

    def held_out_set(self, agent: int, num_agents: int, seed: int, num_tasks: int) -> TaskBatch:
        """Tasks of agent ``agent``'s own test files (:meth:`_own`), which its training never sees."""
        return self.episodes.of(self._own(agent, "test"), self.cfg).sample(
            seeding.generator(seed, seeding.Stream.EVAL, agent), num_tasks)

    def episode(self, path: Path) -> TaskBatch:
        """A user's own episode (``evaluate --episodes``) as a one-task batch: a CSV file with the run's feature and
        target columns and a column ``split`` (support or query), its features standardised as the run's own;
        classification labels numbered 0..n_way-1 in the sorted order of the support's labels."""
        t = self.cfg.task
        classification = t.target_type == "classification"
        table = self._standardised([read_table(path, self.features, t.target, classification, split="split")])[0]
        query = table.query
        for part, rows in (("support", ~query), ("query", query)):
            if not rows.any():
                raise ValueError(f"{path} has no {part} rows (column split)")
        y = torch.from_numpy(table.y)
        if classification:
            support = np.unique(table.y[~query])
            if len(support) != t.n_way:
                names = ", ".join(table.labels[c] for c in support)
                raise ValueError(f"{path} has support rows of {len(support)} label{'' if len(support) == 1 else 's'} "
                                 f"({names}), but the model is {t.n_way}-way (task.n_way): give the episode "
                                 f"{t.n_way} labels")
            unseen = sorted(set(table.y[query].tolist()) - set(support.tolist()))
            if unseen:
                raise ValueError(f"{path}: query label {table.labels[unseen[0]]!r} has no support rows (query labels "
                                 f"must be among the support labels)")
            y = torch.from_numpy(np.searchsorted(support, table.y))
        else:
            y = y[:, None]
        x, q = torch.from_numpy(table.x), torch.from_numpy(query)
        return TaskBatch(x[~q][None], y[~q][None], x[q][None], y[q][None])
