"""How a task adapts the launch model, in training and at test time: the inner rule, and evaluation's adaptation.

An algorithm's inner loop is SGD on the task's support loss; what differs between algorithms is which parameters
it changes and by how much (:class:`InnerRule`): all of them by a fixed rate alpha (MAML, Reptile), only the head
(ANIL), each parameter by a learned rate of its own (Meta-SGD), each layer by a learned rate per step (MAML++).
Learned rates are meta-parameters like the model's weights: they follow the model's parameters in the agent's
flat state (:attr:`InnerRule.layout`), so they are combined with the neighbours', checkpointed and saved with the
model, and a saved model adapts with its own rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from dif_maml_dist.learning.batch import Criterion, LossFn, Params, TaskBatch, make_loss
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.models import Forward

#: fixed: alpha for every parameter; per_parameter: a learned rate per weight (Meta-SGD, Li et al. 2017);
#: per_layer_per_step: a learned rate per parameter tensor and inner step (MAML++'s LSLR, Antoniou et al. 2019)
RATES = ("fixed", "per_parameter", "per_layer_per_step")
#: a learned rate's name in the state and in saved models: the prefix, then the name of the parameter it steps
RATE_PREFIX = "inner_lr:"


def head_indices(model: FlatLayout) -> tuple[int, ...]:
    """The parameters of the model's last layer (those of the module that owns its last parameter): what ANIL
    adapts. For the built-in MLP and Conv4, the final linear layer's weight and bias."""
    owner = model.names[-1].rpartition(".")[0]
    return tuple(i for i, name in enumerate(model.names) if name.rpartition(".")[0] == owner)


@dataclass(frozen=True)
class InnerRule:
    """SGD steps on a task's support loss that change the model's parameters ``adapted`` (indices into its
    layout): by the fixed rate ``lr``, or by learned rates (``rates``, :data:`RATES`) that start at ``lr``."""

    model: FlatLayout  #: the model's parameters: the first entries of the state
    lr: float  #: alpha: the fixed rate, or every learned rate's initial value
    steps: int  #: inner steps in training (per-step rates: as many per layer)
    adapted: tuple[int, ...]  #: the parameters the inner steps change
    rates: str = "fixed"

    def __post_init__(self):
        assert self.rates in RATES and self.adapted and self.steps >= 1, self

    @property
    def adapts_all(self) -> bool:
        return self.adapted == tuple(range(len(self.model.names)))

    @property
    def layout(self) -> FlatLayout:
        """The agent's state: the model's parameters, then the learned rates of each adapted parameter."""
        if self.rates == "fixed":
            return self.model
        names = tuple(RATE_PREFIX + self.model.names[i] for i in self.adapted)
        shapes = tuple(self.model.shapes[i] if self.rates == "per_parameter" else torch.Size([self.steps])
                       for i in self.adapted)
        return FlatLayout(self.model.names + names, self.model.shapes + shapes)

    def initial_rates(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The learned rates' initial values, flat (empty for fixed rates)."""
        return torch.full((self.layout.numel - self.model.numel,), self.lr, dtype=dtype, device=device)

    def split(self, params: Sequence[Tensor]) -> tuple[Params, Params]:
        """(the model's parameters, the learned rates) of a state's parameter tuple."""
        n = len(self.model.names)
        assert len(params) == len(self.layout.names), (len(params), self.layout.names)
        return tuple(params[:n]), tuple(params[n:])

    def step(self, w: Sequence[Tensor], grads: Sequence[Tensor], rates: Sequence[Tensor], k: int) -> Params:
        """The model's parameters after inner step ``k`` (0-based) with ``grads`` of the adapted ones. Steps past
        the trained ones (test-time adaptation may take more) use the last step's rates."""
        out = list(w)
        for j, (i, g) in enumerate(zip(self.adapted, grads)):
            if self.rates == "fixed":
                out[i] = torch.add(w[i], g, alpha=-self.lr)  # one pass over memory, not two
            elif self.rates == "per_parameter":
                out[i] = w[i] - rates[j] * g
            else:
                out[i] = w[i] - rates[j][min(k, self.steps - 1)] * g
        return tuple(out)

    def support_grads(self, loss: LossFn, w: Sequence[Tensor], x: Tensor, y: Tensor, create_graph: bool
                      ) -> tuple[Tensor, ...]:
        """The adapted parameters' gradients of ``loss`` with autograd (one task at a time)."""
        return torch.autograd.grad(loss(w, x, y), [w[i] for i in self.adapted], create_graph=create_graph)

    def support_grad_fn(self, loss: LossFn) -> Callable[[Sequence[Tensor], Tensor, Tensor], tuple[Tensor, ...]]:
        """``f(w, x, y)``: :meth:`support_grads` as a ``torch.func`` transform (composes with vmap and grad)."""
        if self.adapts_all:
            grad = torch.func.grad(loss)
            return lambda w, x, y: grad(tuple(w), x, y)

        def partial_loss(sub: Params, w: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
            full = list(w)
            for i, s in zip(self.adapted, sub):
                full[i] = s
            return loss(full, x, y)

        grad = torch.func.grad(partial_loss)
        return lambda w, x, y: grad(tuple(w[i] for i in self.adapted), w, x, y)


def _curve_point(forward: Forward, criterion: Criterion, metric: Optional[Criterion], params, x: Tensor,
                 y: Tensor) -> tuple[Tensor, Tensor]:
    prediction = forward(params, x)  # one forward for both figures
    return criterion(prediction, y), metric(prediction, y) if metric else prediction.new_zeros(())


def adaptation_curves(forward: Forward, criterion: Criterion, rule: InnerRule, params: Sequence[Tensor],
                      batch: TaskBatch, max_steps: int, metric: Optional[Criterion] = None, chunk: int = 1000,
                      over_agents: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss after 0, 1, ..., ``max_steps`` inner steps of ``rule`` on the support data,
    ``[tasks, steps+1]``, and the same for ``metric`` (e.g. accuracy) if given; ``params``: the state's tuple
    (``rule.layout``: the model's parameters and any learned rates).

    Evaluation only (no meta-gradient), vectorised over tasks in chunks of ``chunk`` to bound memory: ``forward``
    must be exact under vmap. With ``over_agents``, ``params`` hold a leading agent dimension and the results
    are ``[agents, tasks, steps+1]``: every agent on the same tasks, in one vmap.
    """

    def support_loss(w: Params, xs: Tensor, ys: Tensor) -> Tensor:
        return criterion(forward(w, xs), ys)

    support_grads = rule.support_grad_fn(support_loss)

    def curve(state: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        w, rates = rule.split(state)
        points = [_curve_point(forward, criterion, metric, w, xq, yq)]
        for k in range(max_steps):
            w = rule.step(w, support_grads(w, xs, ys), rates, k)
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


def adaptation_curves_loop(forward: Forward, criterion: Criterion, rule: InnerRule, params: Sequence[Tensor],
                           batch: TaskBatch, max_steps: int, metric: Optional[Criterion] = None
                           ) -> tuple[Tensor, Tensor | None]:
    """:func:`adaptation_curves`, one task at a time with autograd (``params`` without an agent dimension).

    For models whose per-task forward is faster than their vmap-exact one (Conv4: native batch norm, and no
    batched convolutions): 2x faster there. Each step keeps no graph beyond the support gradient.
    """
    losses, scores = [], []
    support_loss = make_loss(forward, criterion)
    for t in range(len(batch)):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        points = []
        for w in adapted_models(support_loss, rule, params, xs, ys, max_steps):
            with torch.no_grad():
                points.append(_curve_point(forward, criterion, metric, w, xq, yq))
        losses.append(torch.stack([p[0] for p in points]))
        scores.append(torch.stack([p[1] for p in points]))
    return torch.stack(losses), torch.stack(scores) if metric else None


def adapted_models(loss: LossFn, rule: InnerRule, params: Sequence[Tensor], x: Tensor, y: Tensor,
                   steps: int) -> Iterator[Params]:
    """The model's parameters after 0, 1, ..., ``steps`` inner steps of ``rule`` on one task's support data
    ``(x, y)``, ``loss`` differentiated once per step: test-time adaptation and Reptile's inner loop, with
    autograd, keeping no graph beyond one step's gradient (the yielded tensors are detached). ``params``: the
    state's tuple (model and learned rates)."""
    w, rates = rule.split([p.detach() for p in params])
    yield w
    adapted = set(rule.adapted)
    for k in range(steps):
        w = tuple(p.requires_grad_(True) if i in adapted else p for i, p in enumerate(w))
        grads = rule.support_grads(loss, w, x, y, create_graph=False)
        with torch.no_grad():
            w = rule.step(w, grads, rates, k)
        yield w
