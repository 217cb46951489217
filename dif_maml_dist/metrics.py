"""Metric sinks and network-wide figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import math
from typing import Optional

import torch
from torch import Tensor

#: Per-task test loss and metric (e.g. accuracy; None for regression) after 0..S adaptation steps: ``[tasks, S+1]``.
Curves = tuple[Tensor, Optional[Tensor]]


class MetricsSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Discards records (agents whose figures nobody reads, e.g. in tests)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per line, flushed per record so a crashed run keeps everything logged so far."""

    def __init__(self, path: Path, resume_at: int | None = None):
        """A new stream; or, with ``resume_at``, the existing one continued from a checkpoint of that iteration:
        records of iterations from ``resume_at`` on (written after the checkpoint, before the crash) are
        dropped, since the resumed run writes them again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if resume_at is None:
            # "x": a stream is never appended to another run's (two jobs sharing a run directory fail instead).
            self._fh = path.open("x", encoding="utf-8")
            return
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["iteration"] < resume_at:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by the crash
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ListSink:
    """Keeps records in memory (tests and the in-process runs)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def figures(curves: Curves) -> dict[str, list[float]]:
    """Test figures from per-task curves: mean ``loss`` after 0..S steps, and with a metric, mean ``accuracy`` and
    its 95% confidence half-width over tasks."""
    losses, scores = curves
    out = {"loss": losses.mean(0).tolist()}
    if scores is not None:
        out["accuracy"] = scores.mean(0).tolist()
        out["accuracy_ci95"] = (1.96 * scores.std(0) / math.sqrt(scores.shape[0])).tolist()
    return out


def head(curves: Curves, tasks: int, steps: int) -> Curves:
    """The first ``tasks`` tasks after 0..``steps`` steps of longer curves (what a shorter evaluation of the same
    test set's prefix gives)."""
    return tuple(None if c is None else c[:tasks, :steps + 1] for c in curves)


def centroid_and_disagreement(states: Tensor) -> tuple[Tensor, float]:
    """For stacked agent states ``[K, P]``: the centroid ``w_c`` and ``(1/K) sum_k ||w_k - w_c||^2``."""
    centroid = states.mean(dim=0)
    return centroid, float(((states - centroid) ** 2).sum(dim=1).mean())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, Tensor]) -> None:
    """``torch.save`` a flat dict of tensors (loadable with ``weights_only=True``) via temp file and rename.

    Each tensor is copied first: ``torch.save`` writes a view's whole storage, and the simulator's views share
    one ``[agents, P]`` storage, so every agent's file would otherwise hold every agent."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
