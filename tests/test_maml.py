"""The MAML core against references that share no code with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.config import TaskConfig
from dif_maml_dist.learning.adaptation import adaptation_curves, adaptation_curves_loop
from dif_maml_dist.learning.algorithms import choose_path
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.functional import functional
from dif_maml_dist.learning.models import MLP
from dif_maml_dist.tasks import SinusoidTasks
from tests.helpers import maml, reference_meta_gradient

#: every way to get a meta-gradient: the loop, vmap over the whole batch, and vmap in chunks of 2 tasks
PATHS = [("loop", None), ("vmap", None), ("vmap", 2)]


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


def _meta(path, model, params, batch, alpha, steps, first_order):
    """The meta-gradient by (path, chunk), joined into one vector."""
    fm = functional(model)
    name, chunk = path
    losses = Losses(make_loss(fm.forward), make_loss(fm.forward), make_loss(fm.batched_forward))
    grads, loss = maml(fm.layout, alpha, steps, first_order).meta_gradient(name, losses, fm.layout.split(params), batch,
                                                                           1, chunk)
    return fm.layout.join(grads), loss


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_closed_form_for_linear_model(path, first_order, steps):
    """Catches a missing or wrong Hessian term, a wrong task average (also across vmap chunks: 4 tasks in chunks
    of 2), or a first-order path that is not."""
    model = MLP(1, [], 1).double()  # a single Linear(1, 1): flat = [w, b]
    theta = torch.tensor([0.7, -0.3], dtype=torch.float64)
    batch = _tasks(4)
    alpha = 0.05
    grad, loss = _meta(path, model, theta, batch, alpha, steps, first_order)
    ref_grad, ref_loss = _linear_closed_form(theta.numpy(), batch, alpha, steps, first_order)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-10)


def _mlp_setup(seed=1):
    torch.manual_seed(seed)
    model = MLP(1, [40, 40], 1).double()
    flat = FlatLayout.of(model).flatten(dict(model.named_parameters())).detach()
    return model, flat


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("first_order", [False, True])
def test_every_path_equals_reference_on_mlp(path, first_order):
    """The paths (per-task loop, vmap, chunked vmap) equal a plain-autograd reference on the ReLU MLP, two inner
    steps, five tasks: catches a path that drops a task, mis-weights a chunk, or breaks the written-out forward."""
    model, flat = _mlp_setup()
    batch = _tasks(5)
    grad, loss = _meta(path, model, flat, batch, 0.01, 2, first_order)
    ref = reference_meta_gradient(model, flat, batch, 0.01, 2, first_order, F.mse_loss)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha, min_rel", [(0.01, 0.05), (0.4, 0.3)])
def test_first_order_differs_from_second_order_on_mlp(path, alpha, min_rel):
    """The Hessian term changes the MLP's meta-gradient, at the sinusoid alpha (0.01) and at the paper's
    Omniglot alpha (0.4): catches 'second order' silently being first order on either path."""
    model, flat = _mlp_setup()
    batch = _tasks(3)
    g2, _ = _meta(path, model, flat, batch, alpha, 1, False)
    g1, _ = _meta(path, model, flat, batch, alpha, 1, True)
    assert (g1 - g2).norm() > min_rel * g2.norm()


def test_loop_returns_per_parameter_gradients_and_leaves_params_alone():
    """The loop hands back one gradient per parameter view, shaped like it, and never writes into the agent's
    buffer (the views it gets are the optimizer's parameters)."""
    model, flat = _mlp_setup()
    fm = functional(model)
    before = flat.clone()
    loss = make_loss(fm.forward)
    losses = Losses(loss, loss, loss)
    grads, _ = maml(fm.layout, 0.01).meta_gradient("loop", losses, fm.layout.split(flat), _tasks(2), 1)
    assert [g.shape for g in grads] == list(fm.layout.shapes)
    assert torch.equal(flat, before)


def _explicit_sgd_curve(model, flat, batch, alpha, steps):
    """Per-task query loss after 0..steps plain SGD steps: functional_call and autograd, nothing from
    learning.adaptation."""
    layout = FlatLayout.of(model)
    out = torch.zeros(len(batch), steps + 1, dtype=torch.float64)
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t] for a in batch.tensors())
        w = flat.clone().requires_grad_(True)
        for s in range(steps + 1):
            with torch.no_grad():
                out[t, s] = F.mse_loss(torch.func.functional_call(model, layout.unflatten(w), (xq,)), yq)
            (g,) = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, layout.unflatten(w), (xs,)), ys), w)
            w = (w - alpha * g).detach().requires_grad_(True)
    return out


def test_adaptation_curves_match_explicit_sgd_loop():
    """Evaluation curves = plain SGD steps on each task's support set, query loss after each: vmap in chunks
    (chunk < tasks), one task at a time, and vmap over agents (every agent on the same tasks)
    equal to each agent alone."""
    model, flat = _mlp_setup(2)
    fm = functional(model)
    batch = _tasks(6)
    alpha, steps = 0.02, 4
    ref = _explicit_sgd_curve(model, flat, batch, alpha, steps)
    views, rule = fm.layout.split(flat), maml(fm.layout, alpha).inner
    vmapped, _ = adaptation_curves(fm.batched_forward, F.mse_loss, rule, views, batch, steps, chunk=4)
    looped, _ = adaptation_curves_loop(fm.forward, F.mse_loss, rule, views, batch, steps)
    torch.testing.assert_close(vmapped, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(looped, ref, rtol=1e-12, atol=1e-14)
    other = flat + 0.05 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=flat.dtype)
    stacked = torch.stack([flat, other])
    both, _ = adaptation_curves(fm.batched_forward, F.mse_loss, rule, fm.layout.split(stacked), batch, steps,
                                chunk=4, over_agents=True)
    torch.testing.assert_close(both[0], ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(both[1], _explicit_sgd_curve(model, other, batch, alpha, steps), rtol=1e-12,
                               atol=1e-14)


def test_choose_path():
    """auto picks per model kind: the MLP's loop below its measured crossover and vmap from it, Conv4's loop at any
    batch, an explicit maml.vmap_min_tasks over the kind's default; explicit choices are kept."""
    assert choose_path("auto", "mlp", 1) == "loop"
    assert choose_path("auto", "mlp", 100) == "vmap"
    assert choose_path("auto", "conv4", 100) == "loop"
    assert choose_path("auto", "conv4", 8, vmap_min_tasks=8) == "vmap"
    assert choose_path("loop", "mlp", 100) == "loop"
    with pytest.raises(ValueError):
        choose_path("fast", "mlp", 1)


def test_flat_layout_round_trip_and_views():
    """flatten/unflatten are inverse; split returns views (so writes reach the flat buffer) and keeps leading
    dimensions (agents), and join undoes it."""
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
    stacked = torch.stack([flat, 2 * flat, 3 * flat]).detach()
    parts = layout.split(stacked)
    assert parts[2].shape == (3, 4, 3)
    torch.testing.assert_close(parts[2][1], 2 * views["2.weight"].detach(), rtol=0, atol=0)
    assert torch.equal(layout.join(parts), stacked)


def test_functional_forward_equals_module():
    """The written-out MLP forward on a parameter tuple (its one-input first layer a broadcast product) equals the
    module's own forward, also with several inputs."""
    model, flat = _mlp_setup()
    x = torch.randn(7, 1, dtype=torch.float64)
    fm = functional(model)
    torch.testing.assert_close(fm.forward(fm.layout.split(flat), x), model(x), rtol=1e-14, atol=1e-15)
    wide = MLP(3, [5], 2).double()
    fw = functional(wide)
    flat = fw.layout.flatten(dict(wide.named_parameters())).detach()
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(fw.forward(fw.layout.split(flat), x), wide(x), rtol=1e-14, atol=1e-15)
