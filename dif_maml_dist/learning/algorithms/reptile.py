"""Reptile (Nichol et al. 2018): no gradient through the adaptation and no query loss in the update. Each task
adapts the launch model by the inner steps on its support data, and the update direction is the difference
``w - phi`` between the launch model and the adapted one, averaged over the batch; the local optimizer follows it
as it follows a meta-gradient (plain SGD with step size epsilon is the paper's ``w + epsilon (phi - w)``). The
query loss after adaptation is reported as the training loss, computed without a graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist.learning.adaptation import InnerRule, adapted_models
from dif_maml_dist.learning.algorithms.base import BatchedMetaGradient, chunked_mean, vmap_meta_gradient
from dif_maml_dist.learning.batch import Losses, LossFn, Params, TaskBatch


@dataclass(frozen=True)
class Reptile:
    name: str
    inner: InnerRule  #: fixed rates (a learned rate would get no update: nothing differentiates through it)

    def __post_init__(self):
        assert self.inner.rates == "fixed", self.inner

    def meta_gradient(self, path: str, losses: Losses, params: Sequence[Tensor], batch: TaskBatch, iteration: int,
                      chunk: Optional[int] = None) -> tuple[Params, Tensor]:
        if path == "vmap":
            return vmap_meta_gradient(self, losses, params, batch, iteration, chunk)
        start = self.inner.split([p.detach() for p in params])[0]
        acc = [torch.zeros_like(p) for p in start]
        total = start[0].new_zeros(())
        for t in range(len(batch)):
            xs, ys, xq, yq = (x[t] for x in batch.tensors())
            # differentiated once per step: the forward that is fastest at it
            *_, w = adapted_models(losses.query_loss, self.inner, params, xs, ys, self.inner.steps)
            with torch.no_grad():
                torch._foreach_add_(acc, torch._foreach_sub(start, w))
                total = total + losses.query_loss(w, xq, yq)
        n = len(batch)
        return tuple(torch._foreach_div(acc, n)), total / n

    def batched(self, loss: LossFn, iteration: int, chunk: Optional[int] = None) -> BatchedMetaGradient:
        inner = self.inner
        support_grads = inner.support_grad_fn(loss)

        def task(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Params, Tensor]:
            start, rates = inner.split(params)
            w = start
            for k in range(inner.steps):
                w = inner.step(w, support_grads(w, xs, ys), rates, k)
            return tuple(a - b for a, b in zip(start, w)), loss(w, xq, yq)

        per_task = torch.vmap(task, in_dims=(None, 0, 0, 0, 0))

        def summed(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Params, Tensor]:
            deltas, values = per_task(params, xs, ys, xq, yq)
            return tuple(d.sum(0) for d in deltas), values.sum()

        return chunked_mean(summed, chunk)
