"""Conv4 with batch-statistics normalisation: exact under vmap, and equal to PyTorch's own batch norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.flat import FlatLayout
from dif_maml_dist.maml import TaskBatch, make_loss, meta_gradient_loop, meta_gradient_vmap
from dif_maml_dist.models import BatchStatNorm2d, Conv4, reset_parameters


def test_batch_stat_norm_equals_torch_batch_norm_in_training_mode():
    """Forward values equal F.batch_norm on batch statistics (an implementation sharing no code with ours)."""
    x = torch.randn(10, 4, 7, 7, dtype=torch.float64)
    norm = BatchStatNorm2d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_meta_gradient_vmap_equals_loop(first_order):
    """Omniglot-shaped Conv4 (5-way, 1-shot support, 2 queries per class), 3 tasks, alpha 0.4, float64: the
    vectorised meta-gradient equals the per-task autograd loop — the check that PyTorch's batch norm fails."""
    model = Conv4(1, 5, filters=8, image_size=28).double()
    reset_parameters(model, seeding.generator(0, 9))
    layout = FlatLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).detach()
    g = torch.Generator().manual_seed(1)
    tasks, way = 3, 5
    batch = TaskBatch(torch.randn(tasks, way, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(way).repeat(tasks, 1),
                      torch.randn(tasks, 2 * way, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(way).repeat(tasks, 2))
    loss = make_loss(model, layout, F.cross_entropy)
    g_loop, l_loop = meta_gradient_loop(loss, flat, batch, 0.4, 1, first_order)
    g_vmap, l_vmap = meta_gradient_vmap(loss, flat, batch, 0.4, 1, first_order)
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(l_vmap, l_loop, rtol=1e-12, atol=0)
    assert g_loop.abs().sum() > 0


def test_conv4_shapes():
    """Feature sizes of the paper's two backbones: 64x1x1 for Omniglot 28x28, 32x5x5 for MiniImagenet 84x84."""
    omni, mini = Conv4(1, 20, 64, 28), Conv4(3, 5, 32, 84)
    assert omni[-1].in_features == 64 and mini[-1].in_features == 800
    assert omni(torch.randn(2, 1, 28, 28)).shape == (2, 20)
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 5)
