"""What every meta-learning algorithm provides (:class:`Algorithm`), and how its meta-gradient is computed."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from torch import Tensor

from dif_maml_dist.learning.adaptation import InnerRule
from dif_maml_dist.learning.batch import Losses, LossFn, Params, TaskBatch

#: ``f(params, xs, ys, xq, yq) -> (meta_gradient, mean_meta_loss)`` over a task batch (tensors with a leading task
#: dimension), as a pure ``torch.func`` function: it composes with a further ``vmap`` (over agents: the simulator).
BatchedMetaGradient = Callable[[Params, Tensor, Tensor, Tensor, Tensor], tuple[Params, Tensor]]


class Algorithm(Protocol):
    """A meta-learning algorithm, made decentralized by the runtime: each agent follows its "meta-gradient" with
    its local optimizer, and the Combine step averages the whole state (:attr:`InnerRule.layout`, learned rates
    included) with the neighbours'. The built-ins (``ALGORITHMS``) implement it; a new one is a class with these
    members and an entry there.

    ``params`` is the state's parameter tuple (the model's parameters, then any learned rates); the meta-gradient
    comes back shaped like it. ``iteration`` (1-based) is the training iteration it is for: schedules that change
    the objective over training (MAML++'s annealing) read it.
    """

    name: str
    inner: InnerRule  #: how a task adapts, in training and at test time

    def meta_gradient(self, path: str, losses: Losses, params: Sequence[Tensor], batch: TaskBatch, iteration: int,
                      chunk: Optional[int] = None) -> tuple[Params, Tensor]:
        """The meta-gradient at ``params`` over ``batch`` and the batch's mean meta-training loss (detached), by
        ``path`` (``loop``: one task at a time with autograd; ``vmap``: ``chunk`` tasks at a time)."""
        ...

    def batched(self, loss: LossFn, iteration: int, chunk: Optional[int] = None) -> BatchedMetaGradient:
        """The ``vmap`` path's function, for a loss exact under vmap."""
        ...


def chunked_mean(per_chunk: BatchedMetaGradient, chunk: Optional[int]) -> BatchedMetaGradient:
    """``per_chunk`` returns the sums over the tasks it is given; this runs it over chunks of at most ``chunk``
    tasks (None: all at once; memory grows with the chunk) and returns the means."""

    def mean(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Params, Tensor]:
        params, n = tuple(params), xs.shape[0]
        step = n if chunk is None else chunk
        acc, total = None, None
        for i in range(0, n, step):
            grads, value = per_chunk(params, xs[i:i + step], ys[i:i + step], xq[i:i + step], yq[i:i + step])
            acc = grads if acc is None else tuple(a + g for a, g in zip(acc, grads))
            total = value if total is None else total + value
        return tuple(a / n for a in acc), total / n

    return mean


def vmap_meta_gradient(algorithm: Algorithm, losses: Losses, params: Sequence[Tensor], batch: TaskBatch,
                       iteration: int, chunk: Optional[int]) -> tuple[Params, Tensor]:
    """An algorithm's ``vmap`` path: its :meth:`Algorithm.batched` function on the batch, the loss detached."""
    grads, value = algorithm.batched(losses.batched_loss, iteration, chunk)(tuple(p.detach() for p in params),
                                                                            *batch.tensors())
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
