"""MAML and the algorithms that differ from it only in their inner rule or objective: ANIL, Meta-SGD, and MAML++'s
options, as pure functions of (parameter tuple, task batch).

- MAML (Finn et al. 2017): the gradient of the query loss after the inner steps, differentiated through them
  (second order: the Hessian term ``(I - alpha H)``), or with the inner gradients as constants (first order).
- ANIL (Raghu et al. 2020): the inner steps change the head only (:func:`~dif_maml_dist.learning.adaptation.
  head_indices`); the body still gets its meta-gradient, through the features the head was adapted on. The inner
  gradient is the head's only, so autograd never differentiates twice through the body: the cost is close to
  first-order MAML's (``benchmarks/bench_algorithms.py``).
- Meta-SGD (Li et al. 2017): a learned rate per weight (``InnerRule.rates = per_parameter``), meta-learned with
  the weights.
- MAML++ (Antoniou et al. 2019), as independent options: per-layer per-step learned rates (LSLR,
  ``per_layer_per_step``); the multi-step loss (the query loss after every inner step, weighted, the weights
  annealed towards the last step: :func:`step_loss_weights`); derivative-order annealing (first order up to an
  iteration, second order after).

Two interchangeable ways to get the same meta-gradient (``base.choose_path``):

- ``loop``: one task at a time with ``torch.autograd``; each task's graph is differentiated and freed before
  the next task is built, so memory holds one task's graph, not the meta-batch's.
- ``vmap``: ``torch.func.grad`` of a ``vmap`` over tasks, in chunks of at most ``chunk`` tasks (memory grows
  with the chunk); several times faster for small models from a few tasks up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist.learning.adaptation import InnerRule
from dif_maml_dist.learning.algorithms.base import BatchedMetaGradient, chunked_mean, vmap_meta_gradient
from dif_maml_dist.learning.batch import Losses, LossFn, Params, TaskBatch

#: MAML++'s floor on a non-final step's weight in the multi-step loss, times the number of steps
MSL_MIN_NON_FINAL = 0.03


def step_loss_weights(steps: int, iteration: int, multi_step_loss: bool, anneal_until: int) -> tuple[float, ...]:
    """The weight of the query loss after each inner step in the objective. MAML: the last step's only. MAML++'s
    multi-step loss: all steps equally at the start, then the non-final weights decay linearly to
    ``0.03 / steps`` at iteration ``anneal_until`` (the last step's rising so that the weights sum to 1)."""
    if not multi_step_loss or steps == 1:
        return (0.0,) * (steps - 1) + (1.0,)
    done = 1.0 if anneal_until <= 0 else min(iteration / anneal_until, 1.0)
    non_final = (1.0 - done) / steps + done * MSL_MIN_NON_FINAL / steps
    return (non_final,) * (steps - 1) + (1.0 - (steps - 1) * non_final,)


@dataclass(frozen=True)
class GradientThroughAdaptation:
    """MAML, ANIL, Meta-SGD and MAML++: the meta-gradient is the gradient of a query-loss objective through the
    task's adaptation by ``inner``."""

    name: str
    inner: InnerRule
    first_order: bool = False  #: the inner gradients as constants, throughout
    #: MAML++'s derivative-order annealing: first order up to and including this iteration (0: never)
    first_order_until: int = 0
    multi_step_loss: bool = False  #: MAML++'s multi-step loss (:func:`step_loss_weights`)
    multi_step_loss_until: int = 0  #: the iteration by which its weights have annealed to the last step

    def schedule(self, iteration: int) -> tuple[bool, tuple[float, ...]]:
        """(first order?, the step-loss weights) at training iteration ``iteration`` (1-based)."""
        return (self.first_order or iteration <= self.first_order_until,
                step_loss_weights(self.inner.steps, iteration, self.multi_step_loss, self.multi_step_loss_until))

    def meta_gradient(self, path: str, losses: Losses, params: Sequence[Tensor], batch: TaskBatch, iteration: int,
                      chunk: Optional[int] = None) -> tuple[Params, Tensor]:
        if path == "loop":
            return self._loop(losses, params, batch, iteration)
        return vmap_meta_gradient(self, losses, params, batch, iteration, chunk)

    def _loop(self, losses: Losses, params: Sequence[Tensor], batch: TaskBatch, iteration: int
              ) -> tuple[Params, Tensor]:
        """One task at a time. The query loss is computed by ``losses.query_loss`` (fast to differentiate once),
        the support loss by ``losses.loss`` (differentiated twice, through the inner step) — except where nothing
        is differentiated twice through the model: first order, or only the head adapted (ANIL: the second order
        is the head's alone, and the body's features are differentiated once)."""
        first_order, weights = self.schedule(iteration)
        support_loss = losses.query_loss if first_order or not self.inner.adapts_all else losses.loss
        leaves = [p.detach().requires_grad_(True) for p in params]
        start, rates = self.inner.split(leaves)
        acc: list[Tensor] = []
        total = leaves[0].new_zeros(())
        for t in range(len(batch)):
            xs, ys, xq, yq = (x[t] for x in batch.tensors())
            w, objective = start, None
            for k, weight in enumerate(weights):
                grads = self.inner.support_grads(support_loss, w, xs, ys, create_graph=not first_order)
                w = self.inner.step(w, grads, rates, k)
                if weight:
                    term = losses.query_loss(w, xq, yq)
                    term = term if weight == 1.0 else weight * term
                    objective = term if objective is None else objective + term
            # Differentiated per task, like the peers' per-task backward(): autograd frees this task's graph now,
            # so peak memory is one task's graph whatever the meta-batch.
            task_grads = torch.autograd.grad(objective, leaves)
            if acc:
                torch._foreach_add_(acc, task_grads)  # one fused call instead of a Python loop over tensors
            else:
                acc = list(task_grads)
            total = total + objective.detach()
        n = len(batch)
        return tuple(torch._foreach_div(acc, n)), total / n

    def batched(self, loss: LossFn, iteration: int, chunk: Optional[int] = None) -> BatchedMetaGradient:
        first_order, weights = self.schedule(iteration)
        inner = self.inner
        support_grads = inner.support_grad_fn(loss)

        def task_objective(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
            w, rates = inner.split(params)
            objective = None
            for k, weight in enumerate(weights):
                grads = support_grads(w, xs, ys)
                if first_order:
                    # Detaches from the outer grad transform only: the inner gradient becomes a constant.
                    grads = tuple(g.detach() for g in grads)
                w = inner.step(w, grads, rates, k)
                if weight:
                    term = loss(w, xq, yq)
                    term = term if weight == 1.0 else weight * term
                    objective = term if objective is None else objective + term
            return objective

        per_task = torch.vmap(task_objective, in_dims=(None, 0, 0, 0, 0))

        def summed(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
            if xs.shape[0] == 1:  # one task (the paper's sinusoid setting, vmapped over agents): no vmap level to pay
                return task_objective(params, xs[0], ys[0], xq[0], yq[0])
            return per_task(params, xs, ys, xq, yq).sum()

        return chunked_mean(torch.func.grad_and_value(summed), chunk)
