"""The MAML core against references that share no code with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dif_maml_dist import seeding
from dif_maml_dist.config import TaskConfig
from dif_maml_dist.flat import FlatLayout
from dif_maml_dist.maml import (META_GRADIENT_PATHS, TaskBatch, adaptation_curve, choose_path, make_loss,
                                meta_gradient_loop, meta_gradient_vmap)
from dif_maml_dist.models import MLP
from dif_maml_dist.tasks import SinusoidTasks

PATHS = sorted(META_GRADIENT_PATHS)


def _linear_closed_form(theta, batch: TaskBatch, alpha, steps, first_order):
    """MAML meta-gradient of a linear model y = w x + b under MSE, in numpy.

    With features X = [x, 1], L(t) = |X t - y|^2 / n, grad = 2/n X^T (X t - y), Hessian H = 2/n X^T X (constant),
    so after s inner steps d(t_s)/d(t) = (I - alpha H_s)^s and the second-order gradient is that Jacobian^T times
    the query gradient at t_s; first order drops the Jacobian.
    """
    total = np.zeros(2)
    losses = []
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t].numpy().reshape(-1) for a in batch.tensors())
        fs, fq = np.stack([xs, np.ones_like(xs)], 1), np.stack([xq, np.ones_like(xq)], 1)
        h = 2 / len(xs) * fs.T @ fs
        th = theta.copy()
        for _ in range(steps):
            th = th - alpha * 2 / len(xs) * fs.T @ (fs @ th - ys)
        gq = 2 / len(xq) * fq.T @ (fq @ th - yq)
        jac = np.eye(2) if first_order else np.linalg.matrix_power(np.eye(2) - alpha * h, steps)
        total += jac.T @ gq
        losses.append(np.mean((fq @ th - yq) ** 2))
    return total / len(batch), np.mean(losses)


def _tasks(n, seed=0):
    return SinusoidTasks(TaskConfig(num_support=7, num_query=9)).sample(seeding.generator(seed, 5), n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_closed_form_for_linear_model(path, first_order, steps):
    """Catches a missing or wrong Hessian term, a wrong task average, or a first-order path that is not."""
    model = MLP(1, [], 1).double()  # a single Linear(1, 1): flat = [w, b]
    layout = FlatLayout.of(model)
    theta = torch.tensor([0.7, -0.3], dtype=torch.float64)
    batch = _tasks(4)
    alpha = 0.05
    grad, loss = META_GRADIENT_PATHS[path](make_loss(model, layout), theta, batch, alpha, steps, first_order)
    ref_grad, ref_loss = _linear_closed_form(theta.numpy(), batch, alpha, steps, first_order)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-10)


def _mlp_setup(seed=1):
    torch.manual_seed(seed)
    model = MLP(1, [40, 40], 1).double()
    layout = FlatLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).detach()
    return make_loss(model, layout), flat


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_equals_loop_on_mlp(first_order):
    """The vectorised path must equal the per-task autograd loop (multi-step, several tasks, ReLU MLP)."""
    loss, flat = _mlp_setup()
    batch = _tasks(5)
    g_loop, l_loop = meta_gradient_loop(loss, flat, batch, 0.01, 2, first_order)
    g_vmap, l_vmap = meta_gradient_vmap(loss, flat, batch, 0.01, 2, first_order)
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l_vmap, l_loop, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha, min_rel", [(0.01, 0.05), (0.4, 0.3)])
def test_first_order_differs_from_second_order_on_mlp(path, alpha, min_rel):
    """The Hessian term changes the MLP's meta-gradient, at the sinusoid alpha (0.01) and at the paper's
    Omniglot alpha (0.4): catches 'second order' silently being first order on either path."""
    loss, flat = _mlp_setup()
    batch = _tasks(3)
    g2, _ = META_GRADIENT_PATHS[path](loss, flat, batch, alpha, 1, False)
    g1, _ = META_GRADIENT_PATHS[path](loss, flat, batch, alpha, 1, True)
    assert (g1 - g2).norm() > min_rel * g2.norm()


def test_adaptation_curve_matches_explicit_sgd_loop():
    """Evaluation curve = plain SGD steps on each task's support set, query loss after each, averaged over tasks."""
    loss, flat = _mlp_setup(2)
    batch = _tasks(6)
    alpha, steps = 0.02, 4
    ref = torch.zeros(steps + 1, dtype=torch.float64)
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t] for a in batch.tensors())
        w = flat.clone().requires_grad_(True)
        for s in range(steps + 1):
            with torch.no_grad():
                ref[s] += loss(w, xq, yq) / len(batch)
            (g,) = torch.autograd.grad(loss(w, xs, ys), w)
            w = (w - alpha * g).detach().requires_grad_(True)
    got = adaptation_curve(loss, flat, batch, alpha, steps, chunk=4)  # chunk < tasks: exercises chunking
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_choose_path():
    """auto picks the loop below the measured crossover and vmap at or above it; explicit choices are kept."""
    assert choose_path("auto", 1, 4) == "loop"
    assert choose_path("auto", 4, 4) == "vmap"
    assert choose_path("loop", 100, 4) == "loop"
    with pytest.raises(ValueError):
        choose_path("fast", 1, 4)


def test_flat_layout_round_trip_and_views():
    """flatten/unflatten are inverse; unflatten returns views (so writes reach the flat buffer)."""
    model = MLP(1, [3, 4], 2)
    layout = FlatLayout.of(model)
    named = dict(model.named_parameters())
    flat = layout.flatten(named)
    assert flat.numel() == sum(p.numel() for p in model.parameters()) == layout.numel
    views = layout.unflatten(flat)
    for name, p in named.items():
        torch.testing.assert_close(views[name], p.detach(), rtol=0, atol=0)
    before = flat.clone()
    with torch.no_grad():
        views["2.bias"].fill_(7.0)  # Linear(3, 4)'s bias sits after 0.weight (3) + 0.bias (3) + 2.weight (12)
    assert (flat[18:22] == 7.0).all()
    torch.testing.assert_close(flat[:18], before[:18], rtol=0, atol=0)
    torch.testing.assert_close(flat[22:], before[22:], rtol=0, atol=0)
