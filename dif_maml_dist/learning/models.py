"""The built-in models (the MLP and Conv4), and their forwards written out as pure functions of a parameter tuple
(``learning/functional.py`` hands them to the algorithms).

An algorithm runs a model thousands of times per meta-gradient on parameters that are not the module's own
(adapted weights, other agents' states). ``torch.func.functional_call`` swaps them into the module on every
call, which costs more than the forward pass of the paper's sinusoid MLP; the written-out forwards below call
the same ``torch.nn.functional`` ops on the tuple directly. ``tests/test_maml.py`` (MLP) and
``tests/test_conv4.py`` check each against its module. Any other module is traced into such a function
(``learning/functional.py``, which picks the forwards for a module).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``forward(params, x)``: a model evaluated on a parameter tuple (in its :class:`FlatLayout` order).
Forward = Callable[[Sequence[Tensor], Tensor], Tensor]


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
    2e-4 to 7e-3 relative in float64 (a functorch batching-rule bug, benchmarks/bench_peers.py); mean/var
    written out are exact under both. One task at a time, the native kernel is exact and faster, so
    :func:`functional` uses it there (:func:`batch_stat_norm`). The affine ``weight`` and ``bias`` are ordinary
    parameters, adapted and combined like every other.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_stat_norm(x, self.weight, self.bias, self.eps, native=False)


def batch_stat_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, native: bool) -> Tensor:
    """Batch norm of ``x`` ``[N, C, ...]`` on its own statistics (biased variance, as in training mode):
    PyTorch's kernel (``native``: fast, exact one task at a time, inexact under vmap) or written out (exact
    under vmap). ``weight`` and ``bias`` None: no affine transform."""
    if native:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    if weight is None:
        return x_hat
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x_hat * weight.view(shape) + bias.view(shape)


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


# ------------------------------------------------------------------------------------------ functional models
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if weight.shape[1] == 1:
        # One input feature (the sinusoid's x): a broadcast product, not a matrix product with an inner
        # dimension of one, which batched (vmapped) matrix kernels handle poorly.
        y = x * weight.t()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def mlp_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    last = len(params) // 2 - 1
    for layer in range(last + 1):
        x = linear(x, params[2 * layer], params[2 * layer + 1])
        if layer < last:
            x = F.relu(x)
    return x


def conv4_forward(eps: float, native_norm: bool, channels_last: bool = False) -> Forward:
    def forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
        for block in range(4):  # per block: conv weight, conv bias, norm weight, norm bias
            w, b, gamma, beta = params[4 * block:4 * block + 4]
            x = F.conv2d(x, w, b, padding=1)
            if channels_last:
                # A one-channel input leaves the first convolution's output in NCHW; every later layer follows
                # the layout of its input. Max-pooling is several times faster on channels-last tensors.
                x = x.contiguous(memory_format=torch.channels_last)
            x = F.max_pool2d(F.relu(batch_stat_norm(x, gamma, beta, eps, native_norm)), 2)
        return F.linear(x.flatten(1), params[16], params[17])

    return forward
