"""Sinusoid task sampling: agent slices, separate support/query draws, the shared test set."""

from __future__ import annotations

import math

import pytest
import torch

from dif_maml_dist import seeding
from dif_maml_dist.config import TaskConfig
from dif_maml_dist.tasks import SinusoidTasks


def _amplitude_phase(batch):
    """Recover A and phase of y = A sin(x - phase) = a sin x + b cos x by least squares (exact, noise-free)."""
    x, y = batch.support_x[..., 0], batch.support_y[..., 0]
    feats = torch.stack([torch.sin(x), torch.cos(x)], -1)
    coef = torch.linalg.lstsq(feats, y.unsqueeze(-1)).solution[..., 0]
    a, b = coef[:, 0], coef[:, 1]  # a = A cos(phase), b = -A sin(phase)
    return torch.sqrt(a * a + b * b), torch.atan2(-b, a)


def test_agent_k_draws_amplitudes_from_kth_slice():
    """Catches wrong slice arithmetic (e.g. agents sharing a range, or a slice outside [0.1, 5.0])."""
    cfg = TaskConfig()
    width = (5.0 - 0.1) / 6
    for k in range(6):
        amp, phase = _amplitude_phase(SinusoidTasks(cfg, k, 6).sample(seeding.generator(0, 1, k), 400))
        lo, hi = 0.1 + k * width, 0.1 + (k + 1) * width
        assert amp.min() >= lo - 1e-9 and amp.max() <= hi + 1e-9
        assert amp.min() < lo + 0.1 * width and amp.max() > hi - 0.1 * width  # the whole slice is used
        assert phase.min() >= -1e-9 and phase.max() <= math.pi + 1e-9


def test_support_and_query_are_separate_draws_of_the_same_function():
    """Query points are fresh inputs (not the support ones) on the same sinusoid as the support points."""
    batch = SinusoidTasks(TaskConfig(num_support=10, num_query=15)).sample(seeding.generator(0, 2), 8)
    assert batch.support_x.shape == (8, 10, 1) and batch.query_x.shape == (8, 15, 1)
    assert not torch.isin(batch.query_x, batch.support_x).any()
    amp, phase = _amplitude_phase(batch)
    pred = amp[:, None] * torch.sin(batch.query_x[..., 0] - phase[:, None])
    torch.testing.assert_close(pred, batch.query_y[..., 0], rtol=1e-9, atol=1e-9)


def test_eval_set_is_shared_and_seeded():
    """Every agent evaluates on the same tasks (same seed), which cover the full amplitude range."""
    cfg = TaskConfig(eval_tasks=500)
    a, b = SinusoidTasks.eval_set(cfg, 3), SinusoidTasks.eval_set(cfg, 3)
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)
    assert not torch.equal(SinusoidTasks.eval_set(cfg, 4).support_x, a.support_x)
    amp, _ = _amplitude_phase(a)
    assert amp.min() < 0.3 and amp.max() > 4.8


def test_agent_streams_are_independent_and_reproducible():
    """Different agents get different tasks from one master seed; the same agent gets the same tasks again."""
    cfg = TaskConfig()
    s0 = SinusoidTasks(cfg, 0, 6).sample(seeding.generator(0, seeding.Stream.TASKS, 0), 3)
    s0b = SinusoidTasks(cfg, 0, 6).sample(seeding.generator(0, seeding.Stream.TASKS, 0), 3)
    s1 = SinusoidTasks(cfg, 1, 6).sample(seeding.generator(0, seeding.Stream.TASKS, 1), 3)
    assert torch.equal(s0.support_x, s0b.support_x)
    assert not torch.equal(s0.support_x, s1.support_x)


# The paper's few-shot settings (Dif-MAML appendix D; DESIGN.md §1): way, shot, meta-batch, alpha, inner steps in
# training, adaptation steps at test time, Conv4 filters, image size.
PAPER_FEW_SHOT = {
    "omniglot_5w1s": (5, 1, 16, 0.4, 1, 1, 64, 28),
    "omniglot_5w5s": (5, 5, 8, 0.4, 1, 1, 64, 28),
    "omniglot_20w1s": (20, 1, 16, 0.4, 1, 1, 64, 28),
    "omniglot_20w5s": (20, 5, 8, 0.4, 1, 1, 64, 28),  # not in the paper: its 5-shot meta-batch, 20 ways
    "miniimagenet_5w1s": (5, 1, 4, 0.01, 5, 10, 32, 84),
    "miniimagenet_5w5s": (5, 5, 2, 0.01, 5, 10, 32, 84),
}


@pytest.mark.parametrize("name", sorted(PAPER_FEW_SHOT))
@pytest.mark.parametrize("strategy", ["dif_maml", "centralized", "noncooperative"])
def test_few_shot_configs_carry_the_papers_settings(name, strategy):
    """Each task config, composed by hydra under each strategy with a data root, validates and holds the paper's
    hyper-parameters. Catches a config that drifted from the paper or that a strategy override cannot compose
    with."""
    from dif_maml_dist.run.composition import compose

    cfg = compose([f"task={name}", f"strategy={strategy}", "data.root=/data"]).cfg  # as the entry point does
    t, m = cfg.task, cfg.maml
    assert (t.n_way, t.k_shot, t.meta_batch, m.inner_lr, m.inner_steps, m.eval_inner_steps, cfg.model.filters,
            t.image_size) == PAPER_FEW_SHOT[name]
    assert cfg.strategy.name == strategy and not m.first_order
    assert (t.eval_tasks, t.final_eval_tasks, cfg.optim.name, cfg.optim.lr) == (100, 600, "adam", 0.001)
