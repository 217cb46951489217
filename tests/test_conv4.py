"""Conv4 with batch-statistics normalisation: exact under vmap, and equal to PyTorch's own batch norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dif_maml_dist import seeding
from dif_maml_dist.learning.adaptation import adaptation_curves, adaptation_curves_loop
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.functional import functional
from dif_maml_dist.learning.models import BatchStatNorm2d, Conv4, reset_parameters
from tests.helpers import maml, reference_meta_gradient


def test_batch_stat_norm_equals_torch_batch_norm_in_training_mode():
    """Forward values equal F.batch_norm on batch statistics (an implementation sharing no code with ours)."""
    x = torch.randn(10, 4, 7, 7, dtype=torch.float64)
    norm = BatchStatNorm2d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


def _conv4_problem(filters=8, tasks=3, way=5):
    """An Omniglot-shaped Conv4 (5-way, 1-shot support, 2 queries per class) in float64, and a task batch."""
    model = Conv4(1, way, filters=filters, image_size=28).double()
    reset_parameters(model, seeding.generator(0, 9))
    flat = FlatLayout.of(model).flatten(dict(model.named_parameters())).detach()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(tasks, way, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(way).repeat(tasks, 1),
                      torch.randn(tasks, 2 * way, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(way).repeat(tasks, 2))
    return model, flat, batch


def _torch_batch_norm_twin(model: Conv4) -> nn.Sequential:
    """The same network built from PyTorch's own layers (nn.BatchNorm2d on batch statistics), same weights."""
    layers, channels = [], model[0].in_channels
    for _ in range(4):
        filters = model[0].out_channels
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    layers += [nn.Flatten(), nn.Linear(model[-1].in_features, model[-1].out_features)]
    twin = nn.Sequential(*layers).double()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_meta_gradient_paths_equal_references(first_order):
    """3 tasks, alpha 0.4, float64: the per-task loop (native batch norm; its query loss also channels-last, as
    agents run it), vmap and chunked vmap (written-out batch norm) equal two plain-autograd references — the
    module with our written-out norm, and a twin built from nn.BatchNorm2d. Catches a wrong norm in either
    forward, a dropped task or chunk, and the inexact batch norm under vmap that the written-out one exists for."""
    model, flat, batch = _conv4_problem()
    fm = functional(model)
    views = fm.layout.split(flat)
    loss, batched = make_loss(fm.forward, F.cross_entropy), make_loss(fm.batched_forward, F.cross_entropy)
    ref = reference_meta_gradient(model, flat, batch, 0.4, 1, first_order, F.cross_entropy)
    twin = reference_meta_gradient(_torch_batch_norm_twin(model), flat, batch, 0.4, 1, first_order, F.cross_entropy)
    torch.testing.assert_close(twin, ref, rtol=1e-9, atol=1e-11)
    channels_last = make_loss(fm.first_order_forward, F.cross_entropy)
    for path, chunk, query in (("loop", None, None), ("loop", None, channels_last), ("vmap", None, None),
                               ("vmap", 2, None)):
        grads, _ = maml(fm.layout, 0.4, 1, first_order).meta_gradient(path, Losses(loss, query or loss, batched), views,
                                                                       batch, 1, chunk)
        torch.testing.assert_close(fm.layout.join(grads), ref, rtol=1e-9, atol=1e-11, msg=f"{path} chunk {chunk}")
    assert ref.abs().sum() > 0


def test_conv4_functional_forwards_equal_module():
    """The written-out Conv4 forwards (native batch norm, written-out batch norm, channels-last for evaluation)
    equal the module's own forward."""
    model, flat, batch = _conv4_problem()
    fm = functional(model)
    x = batch.support_x[0]
    for forward in (fm.forward, fm.batched_forward, fm.first_order_forward):
        torch.testing.assert_close(forward(fm.layout.split(flat), x), model(x), rtol=1e-12, atol=1e-12)


def test_conv4_evaluation_paths_agree():
    """Evaluation curves one task at a time (native batch norm, channels-last) equal vmap over tasks (written-out
    batch norm), loss and accuracy, in float64."""
    model, flat, batch = _conv4_problem(tasks=2)
    fm = functional(model)
    views = fm.layout.split(flat)

    def accuracy(logits, y):
        return (logits.argmax(-1) == y).to(logits.dtype).mean()

    rule = maml(fm.layout, 0.4).inner
    looped = adaptation_curves_loop(fm.first_order_forward, F.cross_entropy, rule, views, batch, 3, accuracy)
    vmapped = adaptation_curves(fm.batched_forward, F.cross_entropy, rule, views, batch, 3, accuracy, chunk=2)
    torch.testing.assert_close(looped[0], vmapped[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped[1], vmapped[1], rtol=0, atol=0)


def test_conv4_shapes():
    """Feature sizes of the paper's two backbones: 64x1x1 for Omniglot 28x28, 32x5x5 for MiniImagenet 84x84."""
    omni, mini = Conv4(1, 20, 64, 28), Conv4(3, 5, 32, 84)
    assert omni[-1].in_features == 64 and mini[-1].in_features == 800
    assert omni(torch.randn(2, 1, 28, 28)).shape == (2, 20)
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 5)
