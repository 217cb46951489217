"""Learners as plain ``nn.Module``s; the MAML code calls them through ``torch.func.functional_call``."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """Fully connected ReLU network ``in -> hidden... -> out`` (the paper's sinusoid model is 1-40-40-1)."""

    def __init__(self, in_features: int = 1, hidden: list[int] | tuple[int, ...] = (40, 40), out_features: int = 1):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
