"""One flat buffer for all parameters, so an exchange is one message per neighbour.

The agent keeps its parameters as a single 1-D tensor (the optimizer and the transport see only that);
the algorithms see a tuple of per-parameter views into it, :meth:`FlatLayout.split`, which costs no copy. So
nothing is flattened on the compute path: only the meta-gradient, a tuple, is joined into one vector for the
optimizer (:meth:`FlatLayout.join`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and offsets of a model's parameters inside one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module) -> "FlatLayout":
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-parameter views into ``flat`` (``[..., numel]``: leading dims, e.g. agents, are kept), in layout
        order. Differentiable, and writes to a view write to ``flat``."""
        assert flat.shape[-1] == self.numel, (flat.shape, self.numel)
        out, offset = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[..., offset:offset + n].unflatten(-1, shape) if shape else flat[..., offset])
            offset += n
        return tuple(out)

    def join(self, tensors) -> torch.Tensor:
        """The inverse of :meth:`split`: per-parameter tensors (in layout order, with the same leading dims) as
        one new ``[..., numel]`` tensor."""
        lead = tensors[0].shape[:tensors[0].dim() - len(self.shapes[0])]
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (keyed like the model's parameters) into a new 1-D tensor."""
        missing = set(self.names) - set(tensors)
        if missing:
            raise KeyError(f"missing parameters: {sorted(missing)}")
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` (what a saved model holds)."""
        assert flat.dim() == 1, flat.shape
        return dict(zip(self.names, self.split(flat)))
