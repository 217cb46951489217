"""A user's code as the runtime meets it, for tests/test_custom.py: families and models that break the protocol."""

from __future__ import annotations

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
