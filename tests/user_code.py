"""A user's code as the runtime meets it, for tests/test_custom.py: families and models that break the protocol,
and modules of the kinds the general functional path must run as the module itself does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoSampler:
    """A family that forgot ``sampler``."""

    criterion = staticmethod(F.mse_loss)
    metric = None
    eval_chunk = 10

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self):
        return nn.Linear(1, 1)

    def eval_set(self, seed, num_tasks):
        raise AssertionError("never reached: the missing sampler is reported first")


class TwoOutputs(nn.Module):
    """A regression model with one output too many for the sinusoid's targets."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(1, 2)

    def forward(self, x):
        return self.out(x)


class ThreeWay(nn.Module):
    """A classifier with 3 scores per example, for 5-way tasks."""

    def __init__(self):
        super().__init__()
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))

    def forward(self, x):
        return self.out(x)


class SharedTestsOnly:
    """The example's family without ``held_out_set``: it can test its agents on a shared test folder only."""

    def __init__(self, cfg):
        from site_curves import SiteCurves  # examples/site_curves, on the path in the test

        self._family = SiteCurves(cfg)
        self.criterion, self.metric, self.eval_chunk = F.mse_loss, None, 10
        self.build_model, self.sampler, self.eval_set = (self._family.build_model, self._family.sampler,
                                                         self._family.eval_set)


class Regressor(nn.Module):
    """MLP-like: one input feature (run as a broadcast product, not a matrix product), a layer without bias."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6, bias=False), nn.ReLU())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


class ConvBatchNorm(nn.Module):
    """An image model: convolutions, batch norm with and without an affine transform, pooling; 1 x 8 x 8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.norm2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        return self.head(torch.flatten(F.relu(self.norm2(self.conv2(x))), 1))


class Standardised(nn.Module):
    """A non-parameter buffer (a fixed input standardisation), which stays a constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, -1.0, 2.0]))
        self.register_buffer("std", torch.tensor([2.0, 0.5, 1.5]))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out((x - self.mean) / self.std)


class Tied(nn.Module):
    """One layer applied twice, and an output layer whose weight is the input layer's (tied: one parameter)."""

    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.out.weight = self.inp.weight

    def forward(self, x):
        h = F.relu(self.hidden(F.relu(self.hidden(self.inp(x)))))
        return self.out(h)[:, :2]


class ShapeBranch(nn.Module):
    """Control flow on the input (its number of dimensions): torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        return self.out(torch.tanh(x))
