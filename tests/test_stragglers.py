"""runtime.slowdown: a slow agent, for measuring what stragglers cost (benchmarks/bench_wan.py)."""

from __future__ import annotations

import time

import pytest
import torch

from dif_maml_dist.engine.agent import Agent
from dif_maml_dist.learning.algorithms.maml import GradientThroughAdaptation
from dif_maml_dist.run.validate import validate
from tests.helpers import small_config

PAUSE_S = 0.02


def test_a_slowed_agent_computes_factor_times_longer_and_learns_the_same(monkeypatch):
    """An agent with runtime.slowdown=[[0, 3]] whose meta-gradient takes at least 20 ms spends at least 3 x 20 ms
    per iteration computing (a lower bound that load cannot break), while agent 1, not named, is not slowed; both
    end with the parameters an unslowed agent ends with. Catches the factor applied to the wrong agent, a sleep
    that is not proportional to the compute, or a slowdown that changes the arithmetic."""
    real = GradientThroughAdaptation.meta_gradient

    def slow_meta_gradient(*args, **kwargs):
        time.sleep(PAUSE_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(GradientThroughAdaptation, "meta_gradient", slow_meta_gradient)
    cfg = small_config("noncooperative")
    cfg.runtime.slowdown = [[0, 3.0]]
    plain = small_config("noncooperative")
    slowed, other, reference = Agent(cfg, 0, 6), Agent(cfg, 1, 6), Agent(plain, 0, 6)
    for _ in range(4):
        for a in (slowed, other, reference):
            a.adapt()
    assert slowed.compute_seconds >= 4 * 3 * PAUSE_S
    assert other.slowdown == 1.0 and reference.slowdown == 1.0
    assert torch.equal(slowed.state.params, reference.state.params)


@pytest.mark.parametrize("slowdown, expect", [([[1, 0.5]], "factor >= 1"), ([[-1, 2]], "agent >= 0"),
                                              ([[1, 2], [1, 3]], "names an agent twice"), ([[1]], "[agent, factor]"),
                                              ([2], "entry 2 is not [agent, factor]")])
def test_bad_slowdowns_are_refused(slowdown, expect):
    """A factor below 1 (a faster agent is not a fault), a negative agent, an agent named twice and malformed
    entries (too short, or a bare number instead of a pair: a TypeError while building the message, before) are
    refused in one line naming the setting."""
    cfg = small_config()
    cfg.runtime.slowdown = slowdown
    with pytest.raises(ValueError, match="runtime.slowdown") as refused:
        validate(cfg)
    assert expect in str(refused.value)
