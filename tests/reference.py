"""A dense, single-loop simulation of Dif-MAML: the numerical reference for the agent runtime.

All K agents advance in lock-step in plain Python; the combine is the dense ``W = A^T Phi``. It reuses the
building blocks the unit tests verify on their own (task sampler, meta-gradient, initialisation) and nothing
of the agent loop, transports or the per-agent combine.
"""

from __future__ import annotations

import numpy as np
import torch

from dif_maml_dist import seeding
from dif_maml_dist.agent import build_model, initial_params
from dif_maml_dist.config import Config
from dif_maml_dist.flat import FlatLayout
from dif_maml_dist.maml import make_loss, meta_gradient_loop
from dif_maml_dist.tasks import SinusoidTasks


def dense_reference(cfg: Config, a: np.ndarray, iterations: int) -> torch.Tensor:
    """Final parameters ``[K, P]`` after ``iterations`` of Dif-MAML with combination matrix ``a``."""
    k_agents = a.shape[0]
    dtype = getattr(torch, cfg.train.dtype)
    model = build_model(cfg).to(dtype)
    layout = FlatLayout.of(model)
    loss = make_loss(model, layout)
    params = [initial_params(cfg, k, dtype, torch.device("cpu")) for k in range(k_agents)]
    if cfg.optim.name == "adam":
        opts = [torch.optim.Adam([p], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps) for p in params]
    else:
        opts = [torch.optim.SGD([p], lr=cfg.optim.lr) for p in params]
    gens = [seeding.generator(cfg.seed, seeding.TASKS, k) for k in range(k_agents)]
    tasks = [SinusoidTasks(cfg.task, k, k_agents) for k in range(k_agents)]
    m = cfg.maml
    a_t = torch.as_tensor(a, dtype=dtype).T
    for _ in range(iterations):
        for k in range(k_agents):
            batch = tasks[k].sample(gens[k], cfg.task.meta_batch).to(dtype=dtype)
            params[k].grad, _ = meta_gradient_loop(loss, params[k], batch, m.inner_lr, m.inner_steps, m.first_order)
            opts[k].step()
        w = a_t @ torch.stack(params)
        with torch.no_grad():
            for k in range(k_agents):
                params[k].copy_(w[k])
    return torch.stack(params)
