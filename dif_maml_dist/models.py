"""Learners as plain ``nn.Module``s; the MAML code calls them through ``torch.func.functional_call``."""

from __future__ import annotations

import math

import torch
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


def reset_parameters(model: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from ``gen`` instead of the global RNG.

    The global RNG is shared by every thread of a process (agents of the in-memory network are threads), so
    seeding it per agent would race; an explicit generator makes each agent's draw its own.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                # kaiming_uniform(a=sqrt(5)) and the bias rule of nn.Linear.reset_parameters: U(-1/sqrt(fan_in), ...)
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(module.weight)[0])
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
