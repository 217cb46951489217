"""A user's own task family and model, in one file of the user's own package (README "Your own problem").

Each site (agent) keeps its measurement curves in its own folder, one CSV file of ``x,y`` rows per device; a task
is one device: adapt on a few of its points, predict the others. Agents are tested on devices of a folder that
every node holds a copy of (``data.test_root``), or, without one, each on a quarter of its own devices, held out
of its training. Run it with this folder on ``PYTHONPATH``::

    task=custom task._target_=site_curves.SiteCurves model._target_=site_curves.CurveNet \
        data.agent_root=sites/site{agent} [data.test_root=sites/test]
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dif_maml_dist import TaskBatch, agent_root


def read_curves(folder: Path) -> list[torch.Tensor]:
    """Every ``*.csv`` file of ``folder`` as a ``[rows, 2]`` tensor of (x, y); ``ValueError`` naming file:line."""
    curves = []
    for path in sorted(Path(folder).glob("*.csv")):
        rows = []
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    rows.append((float(row["x"]), float(row["y"])))
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}:{line}: expected numbers in columns x and y, got {row}") from None
        curves.append(torch.tensor(rows, dtype=torch.float32))
    if not curves:
        raise ValueError(f"{folder} holds no *.csv curves")
    return curves


class Curves:
    """Tasks drawn from a list of curves: a curve, then support and query points among its rows."""

    def __init__(self, curves: list[torch.Tensor], support: int, query: int):
        short = [i for i, c in enumerate(curves) if len(c) < support + query]
        if short:
            raise ValueError(f"curve {short[0]} has fewer than {support} + {query} rows (task.num_support + "
                             f"task.num_query)")
        self.curves, self.support, self.query = curves, support, query

    def sample(self, gen: torch.Generator, num_tasks: int) -> TaskBatch:
        picked = []
        for _ in range(num_tasks):
            curve = self.curves[int(torch.randint(len(self.curves), (1,), generator=gen))]
            picked.append(curve[torch.randperm(len(curve), generator=gen)[:self.support + self.query]])
        rows = torch.stack(picked)  # [tasks, support + query, 2]
        x, y = rows[..., :1], rows[..., 1:]
        s = self.support
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


class CurveNet(nn.Module):
    """1 -> width -> width -> 1, with batch normalisation (of each task's own points, as MAML normalises)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SiteCurves:
    """The family: implements dif_maml_dist's ``TaskFamily`` protocol."""

    criterion = staticmethod(F.mse_loss)
    metric = None  # regression: the loss is the figure
    eval_chunk = 100

    def __init__(self, cfg, width: int = 32):
        self.cfg, self.width = cfg, width

    def build_model(self) -> nn.Module:
        return CurveNet(self.width)

    def _devices(self, agent: int, held_out: bool) -> Curves:
        t = self.cfg.task  # this agent's own folder only: data.agent_root with {agent} filled in
        curves = read_curves(agent_root(self.cfg.data, agent))
        if self.cfg.data.test_root is None:  # no shared test devices: hold out a quarter of the site's own
            if len(curves) < 2:
                raise ValueError(f"agent {agent} has {len(curves)} device: it needs 2 or more to hold some out")
            cut = max(1, len(curves) // 4)
            curves = curves[:cut] if held_out else curves[cut:]
        return Curves(curves, t.num_support, t.num_query)

    def sampler(self, agent: int, num_agents: int) -> Curves:
        return self._devices(agent, held_out=False)

    def held_out_set(self, agent: int, num_agents: int, seed: int, num_tasks: int) -> TaskBatch:
        return self._devices(agent, held_out=True).sample(torch.Generator().manual_seed(seed + agent), num_tasks)

    def eval_set(self, seed: int, num_tasks: int) -> TaskBatch:
        if self.cfg.data.test_root is None:
            raise ValueError("site_curves needs test devices: set data.test_root=DIR (the same files on every node)")
        t = self.cfg.task
        tests = Curves(read_curves(Path(self.cfg.data.test_root)), t.num_support, t.num_query)
        return tests.sample(torch.Generator().manual_seed(seed), num_tasks)
