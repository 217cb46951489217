"""The figures of a run from its evaluations: per-task adaptation curves and the network's centroid and
disagreement. Pure functions of tensors."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

#: Per-task test loss and metric (e.g. accuracy; None for regression) after 0..S adaptation steps: ``[tasks, S+1]``.
Curves = tuple[Tensor, Optional[Tensor]]


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


def centroid_and_disagreement(states: Tensor, model_size: Optional[int] = None
                               ) -> tuple[Tensor, float, Optional[float]]:
    """For stacked agent states ``[K, P]``: the centroid ``w_c``, the model's disagreement ``(1/K) sum_k ||w_k -
    w_c||^2`` over its first ``model_size`` entries (default all), and the same over the rest, the algorithm's
    learned inner rates (None if it learns none)."""
    centroid = states.mean(dim=0)
    squares = ((states - centroid) ** 2)
    n = states.shape[1] if model_size is None else model_size
    rates = float(squares[:, n:].sum(dim=1).mean()) if n < states.shape[1] else None
    return centroid, float(squares[:, :n].sum(dim=1).mean()), rates
