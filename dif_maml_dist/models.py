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


class BatchStatNorm2d(nn.Module):
    """Batch normalisation on the statistics of the current batch only, written out in plain tensor ops.

    MAML normalises each task's images with that task's own batch statistics (no running averages). PyTorch's
    ``batch_norm`` under ``torch.vmap`` over tasks gives meta-gradients that differ from the per-task loop by
    ~3e-4 (a functorch batching-rule bug); mean/var written out are exact under both. The affine ``weight`` and
    ``bias`` are ordinary parameters, adapted and combined like every other.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as batch norm in training mode
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class Conv4(nn.Sequential):
    """The few-shot classification backbone of MAML: 4 x [conv 3x3 -> batch norm -> ReLU -> max-pool 2x2] -> linear.

    Omniglot: 1 x 28 x 28 inputs, 64 filters (features 64 x 1 x 1); MiniImagenet: 3 x 84 x 84, 32 filters
    (features 32 x 5 x 5).
    """

    def __init__(self, in_channels: int, num_classes: int, filters: int = 64, image_size: int = 28):
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(channels, filters, 3, padding=1), BatchStatNorm2d(filters), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 max-pool stages")
        layers += [nn.Flatten(), nn.Linear(filters * size * size, num_classes)]
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
            elif isinstance(module, BatchStatNorm2d):  # the identity transform, as nn.BatchNorm2d starts
                module.weight.fill_(1.0)
                module.bias.zero_()
