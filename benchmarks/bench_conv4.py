"""Conv4 meta-gradient: per-task autograd loop vs torch.func grad∘vmap (Omniglot 5-way 1-shot shapes).

Run: .venv/bin/python benchmarks/bench_conv4.py [--threads N] [--repeats R]

Random 28x28 images (the cost does not depend on pixel values), 64 filters, 1 inner step, alpha 0.4, second
order, float32; 15 query images per class. Both paths are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dif_maml_dist import seeding
from dif_maml_dist.flat import FlatLayout
from dif_maml_dist.maml import TaskBatch, make_loss, meta_gradient_loop, meta_gradient_vmap
from dif_maml_dist.models import Conv4, reset_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    way, shot, query = 5, 1, 15
    model = Conv4(1, way, 64, 28)
    reset_parameters(model, seeding.generator(0, 1))
    layout = FlatLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).detach()
    loss = make_loss(model, layout, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    print(f"Conv4 (64 filters, {layout.numel} parameters) meta-gradient, Omniglot {way}-way {shot}-shot, {query} "
          f"queries/class, second order, float32, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'tasks':>6} | {'loop s':>8} {'vmap s':>8} | {'loop/vmap':>9} | faster")
    for n in args.tasks:
        batch = TaskBatch(torch.rand(n, way * shot, 1, 28, 28, generator=g),
                          torch.arange(way).repeat_interleave(shot).repeat(n, 1),
                          torch.rand(n, way * query, 1, 28, 28, generator=g),
                          torch.arange(way).repeat_interleave(query).repeat(n, 1))
        times = {}
        results = {}
        for name, fn in (("loop", meta_gradient_loop), ("vmap", meta_gradient_vmap)):
            results[name] = fn(loss, flat, batch, 0.4, 1, False)[0]  # warm-up and agreement check
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(loss, flat, batch, 0.4, 1, False)
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
        # float32: compare as vectors (single entries carry rounding noise of the whole backward pass)
        rel = float((results["loop"] - results["vmap"]).norm() / results["loop"].norm())
        if rel > 1e-4:
            raise SystemExit(f"loop and vmap disagree at {n} tasks: relative difference {rel:.3g}")
        ratio = times["loop"] / times["vmap"]
        print(f"{n:6d} | {times['loop']:8.3f} {times['vmap']:8.3f} | {ratio:8.2f}x | {'vmap' if ratio > 1 else 'loop':6s}"
              f" (relative difference {rel:.1e})")


if __name__ == "__main__":
    main()
