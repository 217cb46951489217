"""Conv4 meta-gradient and evaluation: per-task loop vs torch.func vmap, at the paper's few-shot settings.

Run: .venv/bin/python benchmarks/bench_conv4.py [--threads N] [--repeats R] [--settings NAME ...]
     [--device cpu|cuda] [--meta-batch N ...] [--no-eval]

For each few-shot config (the shapes and step counts of conf/task/<name>.yaml; random pixels, since the cost does not
depend on them; second order; timed in float32, agreement checked in float64):
- meta-gradient of 1 task and of one meta-batch: per-task autograd loop (native batch norm) vs grad∘vmap over
  tasks (written-out batch norm), both checked to agree before timing (``learning.algorithms``:
  ``build_algorithm(...).meta_gradient("loop" | "vmap", ...)``) — this is what
  ``learning.algorithms.AUTO_VMAP_FROM["conv4"]`` rests on;
- evaluation: adapting ``eval_chunk`` test tasks for 10 steps one task at a time (``adaptation_curves_loop``) vs all
  at once under vmap (``adaptation_curves``) — ``Learner.eval_path`` makes the same choice.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dif_maml_dist import seeding
from dif_maml_dist.config import MamlConfig
from dif_maml_dist.learning.adaptation import adaptation_curves, adaptation_curves_loop
from dif_maml_dist.learning.algorithms import build_algorithm
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss
from dif_maml_dist.learning.functional import functional
from dif_maml_dist.learning.models import Conv4, reset_parameters
from dif_maml_dist.tasks.miniimagenet import MiniImagenetFamily
from dif_maml_dist.tasks.omniglot import OmniglotFamily

CONF = Path(__file__).resolve().parent.parent / "conf" / "task"
FAMILIES = {"omniglot": (1, OmniglotFamily.eval_chunk), "miniimagenet": (3, MiniImagenetFamily.eval_chunk)}


@dataclass(frozen=True)
class Setting:
    channels: int
    size: int
    filters: int
    way: int
    shot: int
    query: int
    inner_lr: float
    inner_steps: int
    meta_batch: int
    eval_chunk: int

    @classmethod
    def from_config(cls, name: str) -> "Setting":
        """The shapes and step counts of conf/task/<name>.yaml."""
        c = OmegaConf.load(CONF / f"{name}.yaml")
        t = c.task
        channels, eval_chunk = FAMILIES[t.name]
        return cls(channels, t.image_size, c.model.filters, t.n_way, t.k_shot, t.q_query, c.maml.inner_lr,
                   c.maml.inner_steps, t.meta_batch, eval_chunk)


SETTINGS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem.split("_")[0] in FAMILIES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time what the device did
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    fn()  # warm-up
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def tasks(s: Setting, n: int, g: torch.Generator, device: torch.device = torch.device("cpu")) -> TaskBatch:
    def images(per: int) -> torch.Tensor:
        return torch.rand(n, s.way * per, s.channels, s.size, s.size, generator=g)

    def labels(per: int) -> torch.Tensor:
        return torch.arange(s.way).repeat_interleave(per).repeat(n, 1)

    return TaskBatch(images(s.shot), labels(s.shot), images(s.query), labels(s.query)).to(device)


def bench(name: str, s: Setting, repeats: int, device: torch.device = torch.device("cpu"),
          meta_batches: tuple[int, ...] = (), evaluation: bool = True) -> None:
    model = Conv4(s.channels, s.way, s.filters, s.size)
    reset_parameters(model, seeding.generator(0, 1))
    model = model.to(device)
    fm = functional(model)
    layout = fm.layout
    flat = layout.flatten(dict(model.named_parameters())).detach()
    params = layout.split(flat)
    loss, batched = make_loss(fm.forward, F.cross_entropy), make_loss(fm.batched_forward, F.cross_entropy)
    query = make_loss(fm.first_order_forward, F.cross_entropy)  # the loop's query loss, as the agents run it
    losses = Losses(loss, query, batched)  # loop: loss and query; vmap: batched
    alg = build_algorithm(MamlConfig(inner_lr=s.inner_lr, inner_steps=s.inner_steps, first_order=False), layout)
    g = torch.Generator().manual_seed(0)
    print(f"\n{name}: Conv4 {s.filters} filters on {s.channels}x{s.size}x{s.size} ({layout.numel} parameters), "
          f"{s.way}-way {s.shot}-shot, {s.query} queries/class, {s.inner_steps} inner step(s), alpha {s.inner_lr}")
    print(f"  meta-gradient {'tasks':>5} | {'loop s':>8} {'vmap s':>8} | loop/vmap | faster")
    params64 = layout.split(flat.double())
    for n in sorted({1, s.meta_batch, *meta_batches}):
        batch = tasks(s, n, g, device)
        # Agreement is checked in float64: with random pixels the images of a task are nearly alike, batch
        # norm divides by a tiny variance, and float32 rounding is amplified past any useful tolerance (the
        # float32 loop itself is then far from the float64 one) — a property of the input, not of either path.
        # One task only: a float64 vmap over MiniImagenet 5-shot batches needs several GB (tests/test_conv4.py
        # checks batched agreement on smaller shapes).
        batch64 = batch.slice(0, 1).to(dtype=torch.float64)
        loop = layout.join(alg.meta_gradient("loop", losses, params64, batch64, 1)[0])
        vmap = layout.join(alg.meta_gradient("vmap", losses, params64, batch64, 1)[0])
        rel = float((loop - vmap).norm() / loop.norm())
        if rel > 1e-10:
            raise SystemExit(f"{name}: loop and vmap disagree: relative difference {rel:.3g}")
        t_loop = median_time(lambda: alg.meta_gradient("loop", losses, params, batch, 1), repeats, device)
        t_vmap = median_time(lambda: alg.meta_gradient("vmap", losses, params, batch, 1), repeats, device)
        print(f"  {'':13} {n:5d} | {t_loop:8.3f} {t_vmap:8.3f} | {t_loop / t_vmap:8.2f}x | "
              f"{'vmap' if t_vmap < t_loop else 'loop'} (float64, 1 task: relative difference {rel:.1e})")
    if not evaluation:
        return
    batch = tasks(s, s.eval_chunk, g, device)
    one_by_one = median_time(lambda: adaptation_curves_loop(fm.forward, F.cross_entropy, alg.inner, params, batch,
                                                            10), repeats, device)
    at_once = median_time(lambda: adaptation_curves(fm.batched_forward, F.cross_entropy, alg.inner, params, batch,
                                                    10, chunk=s.eval_chunk), repeats, device)
    print(f"  evaluation, {s.eval_chunk} tasks x 10 steps: one at a time {one_by_one:.3f} s, vmap over "
          f"{s.eval_chunk} {at_once:.3f} s ({one_by_one / at_once:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with the device synchronised)")
    ap.add_argument("--meta-batch", type=int, nargs="*", default=[],
                    help="meta-batch sizes to time besides 1 and the config's")
    ap.add_argument("--no-eval", action="store_true", help="meta-gradients only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.threads} thread(s), {device}, median of {args.repeats} timed runs after one warm-up")
    for name in args.settings:
        bench(name, Setting.from_config(name), args.repeats, device, tuple(args.meta_batch), not args.no_eval)


if __name__ == "__main__":
    main()
