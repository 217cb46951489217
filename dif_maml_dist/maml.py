"""MAML as pure functions of (flat parameters, task batch).

Two interchangeable ways to get the same meta-gradient, chosen per meta-batch size by measurement
(``benchmarks/bench_meta_gradient.py``):

- ``loop``: one task at a time with ``torch.autograd``; cheapest for the paper's one task per iteration.
- ``vmap``: ``torch.func.grad`` of a ``vmap`` over tasks; exact for models without batch norm and several
  times faster from a few tasks up.

Both differentiate through the inner SGD steps (second order: the Hessian term ``(I - alpha H)``) unless
``first_order`` is set, in which case the inner gradients are treated as constants (FO-MAML).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .flat import FlatLayout

#: ``loss(flat_params, x, y) -> scalar``: the learner's loss on one task's data.
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TaskBatch:
    """A batch of tasks, each with its own support (adaptation) and query (meta-loss) data; dim 0 = task."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Move to ``device``; cast floating-point tensors to ``dtype`` (class labels stay integers)."""
        return TaskBatch(*(t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                           for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def slice(self, start: int, stop: int) -> "TaskBatch":
        return TaskBatch(*(t[start:stop] for t in self.tensors()))


def make_predict(model: nn.Module, layout: FlatLayout) -> Callable[[Tensor, Tensor], Tensor]:
    """``predict(flat_params, x)``: the architecture run on flat parameters (the module's own weights unused)."""

    def predict(flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, layout.unflatten(flat), (x,))

    return predict


def make_loss(model: nn.Module, layout: FlatLayout, criterion=F.mse_loss) -> LossFn:
    """Bind an architecture to a loss over flat parameters."""
    predict = make_predict(model, layout)

    def loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return criterion(predict(flat, x), y)

    return loss


def meta_gradient_loop(loss: LossFn, flat: Tensor, batch: TaskBatch, inner_lr: float, inner_steps: int,
                       first_order: bool = False) -> tuple[Tensor, Tensor]:
    """Meta-gradient and mean meta-loss, one task at a time with ``torch.autograd``."""
    w = flat.detach().requires_grad_(True)
    total = w.new_zeros(())
    for t in range(len(batch)):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        adapted = w
        for _ in range(inner_steps):
            (g,) = torch.autograd.grad(loss(adapted, xs, ys), adapted, create_graph=not first_order)
            adapted = adapted - inner_lr * g
        total = total + loss(adapted, xq, yq)
    total = total / len(batch)
    (meta,) = torch.autograd.grad(total, w)
    return meta, total.detach()


def _task_meta_loss(loss: LossFn, inner_lr: float, inner_steps: int, first_order: bool):
    inner_grad = torch.func.grad(loss)

    def task_meta_loss(w: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        adapted = w
        for _ in range(inner_steps):
            g = inner_grad(adapted, xs, ys)
            if first_order:
                # Detaches from the outer grad transform only: the inner gradient becomes a constant.
                g = g.detach()
            adapted = adapted - inner_lr * g
        return loss(adapted, xq, yq)

    return task_meta_loss


def batched_meta_gradient(loss: LossFn, inner_lr: float, inner_steps: int, first_order: bool = False):
    """``f(w, xs, ys, xq, yq) -> (meta_gradient, mean_meta_loss)`` over a task batch, as a pure ``torch.func``
    function: ``grad`` of the ``vmap``-ped task meta-loss. It composes with a further ``vmap`` (over agents)."""
    per_task = torch.vmap(_task_meta_loss(loss, inner_lr, inner_steps, first_order), in_dims=(None, 0, 0, 0, 0))

    def mean_meta_loss(w: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return per_task(w, xs, ys, xq, yq).mean()

    return torch.func.grad_and_value(mean_meta_loss)


def meta_gradient_vmap(loss: LossFn, flat: Tensor, batch: TaskBatch, inner_lr: float, inner_steps: int,
                       first_order: bool = False) -> tuple[Tensor, Tensor]:
    """Meta-gradient and mean meta-loss, all tasks at once (see :func:`batched_meta_gradient`)."""
    meta, value = batched_meta_gradient(loss, inner_lr, inner_steps, first_order)(flat.detach(), *batch.tensors())
    return meta, value.detach()


META_GRADIENT_PATHS = {"loop": meta_gradient_loop, "vmap": meta_gradient_vmap}


def choose_path(path: str, meta_batch: int, vmap_min_tasks: int) -> str:
    """``auto`` resolves to ``vmap`` from ``vmap_min_tasks`` tasks per batch up, else ``loop``."""
    if path == "auto":
        return "vmap" if meta_batch >= vmap_min_tasks else "loop"
    if path not in META_GRADIENT_PATHS:
        raise ValueError(f"unknown maml.meta_grad_path {path!r}; choose one of: auto, loop, vmap")
    return path


def adaptation_curves(loss: LossFn, flat: Tensor, batch: TaskBatch, inner_lr: float, max_steps: int,
                      score: LossFn | None = None, chunk: int = 1000) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss after 0, 1, ..., ``max_steps`` inner SGD steps on the support data, ``[tasks, steps+1]``,
    and the same for ``score(flat, x, y)`` (e.g. accuracy) if given.

    Evaluation only (no meta-gradient): vectorised over tasks in chunks of ``chunk`` to bound memory.
    """
    inner_grad = torch.func.grad(loss)

    def curve(w: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        losses, scores = [loss(w, xq, yq)], [score(w, xq, yq) if score else w.new_zeros(())]
        for _ in range(max_steps):
            w = w - inner_lr * inner_grad(w, xs, ys)
            losses.append(loss(w, xq, yq))
            scores.append(score(w, xq, yq) if score else w.new_zeros(()))
        return torch.stack(losses), torch.stack(scores)

    per_task = torch.vmap(curve, in_dims=(None, 0, 0, 0, 0))
    w = flat.detach()
    parts = [per_task(w, *batch.slice(i, i + chunk).tensors()) for i in range(0, len(batch), chunk)]
    losses = torch.cat([p[0] for p in parts]).detach()
    return losses, torch.cat([p[1] for p in parts]).detach() if score else None


def adaptation_curve(loss: LossFn, flat: Tensor, batch: TaskBatch, inner_lr: float, max_steps: int,
                     chunk: int = 1000) -> Tensor:
    """Mean query loss over tasks after 0..max_steps inner SGD steps; shape ``[max_steps+1]``."""
    return adaptation_curves(loss, flat, batch, inner_lr, max_steps, chunk=chunk)[0].mean(0)
