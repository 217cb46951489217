"""MAML as pure functions of (parameter tuple, task batch).

Parameters are a tuple of tensors in a :class:`~dif_maml_dist.learning.flat.FlatLayout`'s order (views into the agent's
flat buffer); gradients come back as a tuple of the same shapes. Two interchangeable ways to get the same
meta-gradient, chosen per model family and meta-batch size by measurement (:func:`choose_path`,
``benchmarks/bench_peers.py``):

- ``loop``: one task at a time with ``torch.autograd``; each task's graph is differentiated and freed before
  the next task is built, so memory holds one task's graph, not the meta-batch's.
- ``vmap``: ``torch.func.grad`` of a ``vmap`` over tasks, in chunks of at most ``chunk`` tasks (memory grows
  with the chunk); several times faster for small models from a few tasks up.

Both differentiate through the inner SGD steps (second order: the Hessian term ``(I - alpha H)``) unless
``first_order`` is set, in which case the inner gradients are treated as constants (FO-MAML).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dif_maml_dist.learning.models import Forward

Params = tuple[Tensor, ...]
#: ``loss(params, x, y) -> scalar``: the learner's loss on one task's data.
LossFn = Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]


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

    def to_device(self, device: torch.device, dtype=None) -> "TaskBatch":
        """A batch sampled on the host, moved to ``device`` the way a training step should: to a GPU through
        pinned memory without blocking the host (the copy is ordered before the kernels that read it)."""
        if device.type != "cuda":
            return self.to(device, dtype)
        return TaskBatch(*(t.pin_memory().to(device=device, dtype=dtype if t.is_floating_point() else None,
                                             non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def slice(self, start: int, stop: int) -> "TaskBatch":
        return TaskBatch(*(t[start:stop] for t in self.tensors()))


def make_loss(forward: Forward, criterion=F.mse_loss) -> LossFn:
    """Bind a model's forward (see :func:`~dif_maml_dist.learning.functional.functional`) to a loss."""

    def loss(params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return criterion(forward(params, x), y)

    return loss


def _sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> list[Tensor]:
    return [torch.add(p, g, alpha=-lr) for p, g in zip(params, grads)]  # one pass over memory, not two


def meta_gradient_loop(loss: LossFn, params: Sequence[Tensor], batch: TaskBatch, inner_lr: float,
                       inner_steps: int, first_order: bool = False, query_loss: Optional[LossFn] = None
                       ) -> tuple[Params, Tensor]:
    """Meta-gradient (a tuple shaped like ``params``) and mean meta-loss, one task at a time with autograd.

    ``query_loss`` (default ``loss``): the same loss computed in a way that is fast to differentiate once — the
    query loss is, while the support loss is differentiated twice (through the inner step).
    """
    query_loss = query_loss or loss
    leaves = [p.detach().requires_grad_(True) for p in params]
    acc: list[Tensor] = []
    total = leaves[0].new_zeros(())
    for t in range(len(batch)):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        adapted = leaves
        for _ in range(inner_steps):
            grads = torch.autograd.grad(loss(adapted, xs, ys), adapted, create_graph=not first_order)
            adapted = _sgd(adapted, grads, inner_lr)
        query = query_loss(adapted, xq, yq)
        # Differentiated per task, like the peers' per-task backward(): autograd frees this task's graph now,
        # so peak memory is one task's graph whatever the meta-batch.
        task_grads = torch.autograd.grad(query, leaves)
        if acc:
            torch._foreach_add_(acc, task_grads)  # one fused call instead of a Python loop over tensors
        else:
            acc = list(task_grads)
        total = total + query.detach()
    n = len(batch)
    return tuple(torch._foreach_div(acc, n)), total / n


def _task_meta_loss(loss: LossFn, inner_lr: float, inner_steps: int, first_order: bool):
    inner_grad = torch.func.grad(loss)

    def task_meta_loss(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        adapted = params
        for _ in range(inner_steps):
            grads = inner_grad(adapted, xs, ys)
            if first_order:
                # Detaches from the outer grad transform only: the inner gradient becomes a constant.
                grads = tuple(g.detach() for g in grads)
            adapted = tuple(_sgd(adapted, grads, inner_lr))
        return loss(adapted, xq, yq)

    return task_meta_loss


def batched_meta_gradient(loss: LossFn, inner_lr: float, inner_steps: int, first_order: bool = False,
                          chunk: Optional[int] = None):
    """``f(params, xs, ys, xq, yq) -> (meta_gradient, mean_meta_loss)`` over a task batch, as a pure ``torch.func``
    function: ``grad`` of the ``vmap``-ped task meta-loss, over chunks of at most ``chunk`` tasks (None: all at
    once). It composes with a further ``vmap`` (over agents: the simulator)."""
    task_meta_loss = _task_meta_loss(loss, inner_lr, inner_steps, first_order)
    per_task = torch.vmap(task_meta_loss, in_dims=(None, 0, 0, 0, 0))

    def summed_meta_loss(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        if xs.shape[0] == 1:  # one task (the paper's sinusoid setting, vmapped over agents): no vmap level to pay
            return task_meta_loss(params, xs[0], ys[0], xq[0], yq[0])
        return per_task(params, xs, ys, xq, yq).sum()

    grad_and_sum = torch.func.grad_and_value(summed_meta_loss)

    def meta_gradient(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor):
        params, n = tuple(params), xs.shape[0]
        step = n if chunk is None else chunk
        acc, total = None, None
        for i in range(0, n, step):
            grads, value = grad_and_sum(params, xs[i:i + step], ys[i:i + step], xq[i:i + step], yq[i:i + step])
            acc = grads if acc is None else tuple(a + g for a, g in zip(acc, grads))
            total = value if total is None else total + value
        return tuple(a / n for a in acc), total / n

    return meta_gradient


def meta_gradient_vmap(loss: LossFn, params: Sequence[Tensor], batch: TaskBatch, inner_lr: float,
                       inner_steps: int, first_order: bool = False, chunk: Optional[int] = None
                       ) -> tuple[Params, Tensor]:
    """Meta-gradient and mean meta-loss, ``chunk`` tasks at a time (see :func:`batched_meta_gradient`)."""
    f = batched_meta_gradient(loss, inner_lr, inner_steps, first_order, chunk)
    grads, value = f(tuple(p.detach() for p in params), *batch.tensors())
    return grads, value.detach()


META_GRADIENT_PATHS = ("loop", "vmap")

#: ``auto``: the smallest meta-batch from which vmap is faster, per model kind (``functional.FunctionalModel.kind``),
#: measured by ``benchmarks/bench_peers.py`` on a 2-core CPU; None: the loop always wins (Conv4: batched
#: convolutions are memory-bound, and vmap needs the slower written-out batch norm).
AUTO_VMAP_FROM = {"mlp": 4, "conv4": None, "module": None}


def choose_path(path: str, kind: str, meta_batch: int, vmap_min_tasks: Optional[int] = None) -> str:
    """``auto`` resolves to ``vmap`` from ``vmap_min_tasks`` tasks per batch up (default: the model kind's measured
    crossover, :data:`AUTO_VMAP_FROM`), else ``loop``."""
    if path == "auto":
        threshold = vmap_min_tasks if vmap_min_tasks is not None else AUTO_VMAP_FROM.get(kind)
        return "vmap" if threshold is not None and meta_batch >= threshold else "loop"
    if path not in META_GRADIENT_PATHS:
        raise ValueError(f"unknown maml.meta_grad_path {path!r}; choose one of: auto, loop, vmap")
    return path


def meta_gradient(path: str, loss: LossFn, batched_loss: LossFn, params: Sequence[Tensor], batch: TaskBatch,
                  inner_lr: float, inner_steps: int, first_order: bool = False, chunk: Optional[int] = None,
                  query_loss: Optional[LossFn] = None) -> tuple[Params, Tensor]:
    """The meta-gradient by ``path`` (``loop`` uses ``loss`` and ``query_loss``, ``vmap`` the vmap-exact
    ``batched_loss``)."""
    if path == "loop":
        return meta_gradient_loop(loss, params, batch, inner_lr, inner_steps, first_order, query_loss)
    return meta_gradient_vmap(batched_loss, params, batch, inner_lr, inner_steps, first_order, chunk)


#: ``criterion(prediction, target) -> scalar`` (a loss, or a metric such as accuracy).
Criterion = Callable[[Tensor, Tensor], Tensor]


def _curve_point(forward: Forward, criterion: Criterion, metric: Optional[Criterion], params, x: Tensor,
                 y: Tensor) -> tuple[Tensor, Tensor]:
    prediction = forward(params, x)  # one forward for both figures
    return criterion(prediction, y), metric(prediction, y) if metric else prediction.new_zeros(())


def adaptation_curves(forward: Forward, criterion: Criterion, params: Sequence[Tensor], batch: TaskBatch,
                      inner_lr: float, max_steps: int, metric: Optional[Criterion] = None, chunk: int = 1000,
                      over_agents: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss after 0, 1, ..., ``max_steps`` inner SGD steps on the support data, ``[tasks, steps+1]``,
    and the same for ``metric`` (e.g. accuracy) if given.

    Evaluation only (no meta-gradient), vectorised over tasks in chunks of ``chunk`` to bound memory: ``forward``
    must be exact under vmap. With ``over_agents``, ``params`` hold a leading agent dimension and the results
    are ``[agents, tasks, steps+1]``: every agent on the same tasks, in one vmap.
    """

    def support_loss(w: Params, xs: Tensor, ys: Tensor) -> Tensor:
        return criterion(forward(w, xs), ys)

    inner_grad = torch.func.grad(support_loss)

    def curve(w: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        points = [_curve_point(forward, criterion, metric, w, xq, yq)]
        for _ in range(max_steps):
            w = tuple(_sgd(w, inner_grad(w, xs, ys), inner_lr))
            points.append(_curve_point(forward, criterion, metric, w, xq, yq))
        return torch.stack([p[0] for p in points]), torch.stack([p[1] for p in points])

    per_task = torch.vmap(curve, in_dims=(None, 0, 0, 0, 0))
    if over_agents:
        per_task = torch.vmap(per_task, in_dims=(0, None, None, None, None))
    w = tuple(p.detach() for p in params)
    parts = [per_task(w, *batch.slice(i, i + chunk).tensors()) for i in range(0, len(batch), chunk)]
    dim = 1 if over_agents else 0
    losses = torch.cat([p[0] for p in parts], dim=dim).detach()
    return losses, torch.cat([p[1] for p in parts], dim=dim).detach() if metric else None


def adaptation_curves_loop(forward: Forward, criterion: Criterion, params: Sequence[Tensor], batch: TaskBatch,
                           inner_lr: float, max_steps: int, metric: Optional[Criterion] = None
                           ) -> tuple[Tensor, Tensor | None]:
    """:func:`adaptation_curves`, one task at a time with autograd (``params`` without an agent dimension).

    For models whose per-task forward is faster than their vmap-exact one (Conv4: native batch norm, and no
    batched convolutions): 2x faster there. Each step keeps no graph beyond the support gradient.
    """
    losses, scores = [], []
    for t in range(len(batch)):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        points = []
        for w in sgd_adaptation(forward, criterion, params, xs, ys, inner_lr, max_steps):
            with torch.no_grad():
                points.append(_curve_point(forward, criterion, metric, w, xq, yq))
        losses.append(torch.stack([p[0] for p in points]))
        scores.append(torch.stack([p[1] for p in points]))
    return torch.stack(losses), torch.stack(scores) if metric else None


def sgd_adaptation(forward: Forward, criterion: Criterion, params: Sequence[Tensor], x: Tensor, y: Tensor,
                   inner_lr: float, steps: int) -> Iterator[list[Tensor]]:
    """The parameters after 0, 1, ..., ``steps`` plain SGD steps on one task's support data ``(x, y)``: test-time
    adaptation, with autograd, keeping no graph beyond one step's gradient (the yielded tensors are detached)."""
    w = [p.detach() for p in params]
    yield w
    for _ in range(steps):
        w = [p.requires_grad_(True) for p in w]
        grads = torch.autograd.grad(criterion(forward(w, x), y), w)
        with torch.no_grad():
            w = _sgd(w, grads, inner_lr)
        yield w

