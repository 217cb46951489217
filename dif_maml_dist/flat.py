"""One flat buffer for all parameters, so an exchange is one message per neighbour.

The agent keeps its parameters as a single 1-D tensor; :meth:`FlatLayout.unflatten` gives named views into it
(no copy) for ``torch.func.functional_call``. Gradients taken with respect to the flat tensor are flat too, so
the optimizer, the exchange and the combine all work on one contiguous buffer.
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

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (keyed like the model's parameters) into a new 1-D tensor."""
        missing = set(self.names) - set(tensors)
        if missing:
            raise KeyError(f"missing parameters: {sorted(missing)}")
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` (differentiable; writes to a view write to ``flat``)."""
        assert flat.dim() == 1 and flat.numel() == self.numel, (flat.shape, self.numel)
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out
