"""What every meta-learning algorithm computes on: a batch of tasks, and a model bound to a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dif_maml_dist.learning.models import Forward

Params = tuple[Tensor, ...]
#: ``loss(params, x, y) -> scalar``: the learner's loss on one task's data, ``params`` the model's parameters.
LossFn = Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]
#: ``criterion(prediction, target) -> scalar`` (a loss, or a metric such as accuracy).
Criterion = Callable[[Tensor, Tensor], Tensor]


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


class Losses(NamedTuple):
    """One model's loss in the three forms the meta-gradient paths use (``learning.functional``'s forwards)."""

    loss: LossFn  #: one task at a time, differentiated twice (the per-task loop's support loss)
    query_loss: LossFn  #: the same, where it is differentiated once only (the per-task loop's query loss)
    batched_loss: LossFn  #: the same, exact under ``torch.vmap`` (the vmap path, the simulator)
