"""A user's own nn.Module through the general functional path, next to the built-in models' written-out forwards.

Run: .venv/bin/python benchmarks/bench_general_path.py [--quick] [--threads T]

The built-in MLP and Conv4 have forwards written out by hand (``models.mlp_forward``, ``models.conv4_forward``);
any other module goes through ``learning.functional``'s general path: traced once by ``torch.fx`` into a function of
the parameter tuple, or where it cannot be traced, ``torch.func.functional_call``. Here the same networks are
written as a user writes them (``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``; of ``nn.Conv2d``/``nn.BatchNorm2d``/
``nn.ReLU``/``nn.MaxPool2d``), on the same weights, and each way is timed side by side, calls interleaved:

- written-out: what ``learning.functional`` gives the built-in model;
- traced: what it gives the user's module (the general path);
- functional_call: the user's module through ``torch.func.functional_call`` per call (the fallback, and the
  general path before the trace).

Workloads: the sinusoid MLP 1-40-40-1 (10+10 points, alpha 0.01, 1 inner step): its forward alone, the
meta-gradient at meta-batch 1 (conf/task/sinusoid.yaml) and 5 by both paths (``loop``, ``vmap``), second order, and
its evaluation (vmap over 1000 tasks, 10 steps, as ``Learner.eval_path`` does for MLPs); Conv4 at Omniglot 5w1s
(conf/task/omniglot_5w1s.yaml: 64 filters, 1x28x28, 1 query per class, alpha 0.4, meta-batch 16): its forward
alone, both paths, and its evaluation (one task at a time, 10 steps, as for Conv4). Every way's meta-gradient is
first checked in float64 against the written-out one (relative difference above 1e-10: abort); timing is float32,
one thread by default.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _cpu_share, bench_meta_gradient, bench_conv4

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _cpu_share import CpuShare  # noqa: E402
from bench_conv4 import Setting, tasks  # noqa: E402
from bench_meta_gradient import time_blocks  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from dif_maml_dist import seeding  # noqa: E402
from dif_maml_dist.config import Config, MamlConfig  # noqa: E402
from dif_maml_dist.learning.adaptation import adaptation_curves, adaptation_curves_loop  # noqa: E402
from dif_maml_dist.learning.algorithms import Algorithm, build_algorithm  # noqa: E402
from dif_maml_dist.learning.batch import Losses, make_loss  # noqa: E402
from dif_maml_dist.learning.functional import functional  # noqa: E402
from dif_maml_dist.learning.models import Conv4, reset_parameters  # noqa: E402
from dif_maml_dist.tasks import SinusoidTasks, task_family  # noqa: E402

WAYS = ("written-out", "traced", "functional_call")


def users_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def users_conv4(s: Setting) -> nn.Module:
    layers, channels = [], s.channels
    for _ in range(4):
        layers += [nn.Conv2d(channels, s.filters, 3, padding=1), nn.BatchNorm2d(s.filters), nn.ReLU(), nn.MaxPool2d(2)]
        channels = s.filters
    size = s.size // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(s.filters * size * size, s.way))


def forwards(builtin: nn.Module, user: nn.Module) -> dict[str, tuple]:
    """Per way: (forward, batched_forward, first_order_forward)."""
    fast, traced = functional(builtin), functional(user)  # functional() also makes the user's batch norm per-batch
    assert fast.kind != "module" and traced.kind == "module", (fast.kind, traced.kind)
    assert fast.layout.shapes == traced.layout.shapes, "the user's module must have the built-in's parameters"
    names = traced.layout.names

    def call(params, x):
        return functional_call(user, dict(zip(names, params)), (x,))

    return {"written-out": (fast.forward, fast.batched_forward, fast.first_order_forward),
            "traced": (traced.forward, traced.batched_forward, traced.first_order_forward),
            "functional_call": (call, call, call)}


def maml(layout, inner_lr: float, inner_steps: int) -> Algorithm:
    """Plain second-order MAML for a model with parameters ``layout``."""
    return build_algorithm(MamlConfig(inner_lr=inner_lr, inner_steps=inner_steps, first_order=False), layout)


def meta_gradient_calls(ways, criterion, params, batch, alg: Algorithm, path):
    calls = {}
    for way, (forward, batched, first_order) in ways.items():
        # loop: as the agents run it, the query loss through the first-order forward; vmap: the batched loss
        losses = Losses(make_loss(forward, criterion), make_loss(first_order, criterion), make_loss(batched, criterion))
        calls[way] = lambda losses=losses: alg.meta_gradient(path, losses, params, batch, 1)
    return calls


def check(ways, criterion, params64, batch64, alg: Algorithm, what) -> float:
    """Largest relative difference, in float64, of each way's meta-gradient (both paths) from the written-out
    loop's; exits above 1e-10."""
    def flat(grads):
        return torch.cat([g.reshape(-1) for g in grads])

    ref = flat(meta_gradient_calls(ways, criterion, params64, batch64, alg, "loop")["written-out"]()[0])
    worst = 0.0
    for path in ("loop", "vmap"):
        for way, fn in meta_gradient_calls(ways, criterion, params64, batch64, alg, path).items():
            rel = float((flat(fn()[0]) - ref).norm() / ref.norm())
            if rel > 1e-10:
                sys.exit(f"ABORT: {what}, {way} {path}: meta-gradient differs from the written-out loop's by {rel:.2e} "
                         f"(relative, float64). Timing skipped.")
            worst = max(worst, rel)
    return worst


def row(label: str, blocks: dict[str, list[float]]) -> None:
    """Median time per way, and each way's median over blocks of its time / the written-out one's in the same
    block: other jobs' load changes between blocks more than within one, so paired ratios are steadier."""
    def ratio(way):
        return statistics.median(a / b for a, b in zip(blocks[way], blocks["written-out"]))

    print(f"  {label:<38} " + " ".join(f"{statistics.median(blocks[way]) * 1e3:>12.3f}" for way in WAYS)
          + f" {ratio('traced'):>9.2f}x {ratio('functional_call'):>9.2f}x")


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<38} " + " ".join(f"{way + ' ms':>12}" for way in WAYS[:2]) + f" {'fcall ms':>12}"
          f" {'traced/wo':>10} {'fcall/wo':>9}")


def bench_mlp(block_s: float, blocks: int) -> None:
    cfg = Config()
    builtin = task_family(cfg).build_model()
    reset_parameters(builtin, seeding.generator(0, 1))
    user = users_mlp()
    ways = forwards(builtin, user)
    layout = functional(builtin).layout
    flat = layout.flatten(dict(builtin.named_parameters())).detach()
    params = layout.split(flat)
    m = cfg.maml
    alg = maml(layout, m.inner_lr, m.inner_steps)
    gen = seeding.generator(0, 99)
    sample = SinusoidTasks(cfg.task).sample
    worst = check(ways, F.mse_loss, layout.split(flat.double()), sample(gen, 3).to(dtype=torch.float64), alg, "MLP")
    header(f"sinusoid MLP 1-40-40-1, {cfg.task.num_support}+{cfg.task.num_query} points, {m.inner_steps} inner step, "
           f"alpha {m.inner_lr}, second order (float64 check: largest relative difference {worst:.1e})")
    support = sample(gen, 1).support_x[0].float()
    row(f"forward alone, {len(support)} points", time_blocks(
        {way: (lambda f=f: f(params, support)) for way, (f, _, _) in ways.items()}, block_s, blocks))
    for n in sorted({cfg.task.meta_batch, 5}):
        batch = sample(gen, n).to(dtype=torch.float32)
        for path in ("loop", "vmap"):
            calls = meta_gradient_calls(ways, F.mse_loss, params, batch, alg, path)
            row(f"meta-gradient {path}, {n} task(s)", time_blocks(calls, block_s, blocks))
    chunk = type(task_family(cfg)).eval_chunk
    batch = sample(gen, chunk).to(dtype=torch.float32)
    calls = {way: (lambda b=b: adaptation_curves(b, F.mse_loss, alg.inner, params, batch, 10, chunk=chunk))
             for way, (_, b, _) in ways.items()}
    row(f"evaluation, vmap {chunk} tasks x 10 steps", time_blocks(calls, block_s, blocks))


def bench_conv4(block_s: float, blocks: int, meta_batch: int | None) -> None:
    s = Setting.from_config("omniglot_5w1s")
    builtin = Conv4(s.channels, s.way, s.filters, s.size)
    reset_parameters(builtin, seeding.generator(0, 1))
    ways = forwards(builtin, users_conv4(s))
    layout = functional(builtin).layout
    flat = layout.flatten(dict(builtin.named_parameters())).detach()
    params = layout.split(flat)
    alg = maml(layout, s.inner_lr, s.inner_steps)
    g = torch.Generator().manual_seed(0)
    worst = check(ways, F.cross_entropy, layout.split(flat.double()), tasks(s, 2, g).to(dtype=torch.float64), alg,
                  "Conv4")
    n = meta_batch or s.meta_batch
    header(f"Conv4 Omniglot 5w1s: {s.filters} filters on {s.channels}x{s.size}x{s.size}, {s.query} query/class, "
           f"{s.inner_steps} inner step, alpha {s.inner_lr}, second order (float64 check: largest relative "
           f"difference {worst:.1e})")
    batch = tasks(s, n, g)
    support = batch.support_x[0]
    row(f"forward alone, {len(support)} images", time_blocks(
        {way: (lambda f=f: f(params, support)) for way, (f, _, _) in ways.items()}, 0.05, blocks))
    for path in ("loop", "vmap"):
        calls = meta_gradient_calls(ways, F.cross_entropy, params, batch, alg, path)
        row(f"meta-gradient {path}, {n} tasks", time_blocks(calls, block_s, blocks))
    evals = tasks(s, 2, g)
    calls = {way: (lambda f=f: adaptation_curves_loop(f, F.cross_entropy, alg.inner, params, evals, 10))
             for way, (_, _, f) in ways.items()}
    row("evaluation, 2 tasks x 10 steps, loop", time_blocks(calls, block_s, blocks))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing blocks; Conv4 at 4 tasks")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as an agent process)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mlp_blocks, conv_blocks = (7, 3) if args.quick else (25, 7)
    print(f"general path vs written-out forwards: torch {torch.__version__}, {args.threads} thread(s), python "
          f"{platform.python_version()}; median over interleaved blocks ({mlp_blocks} of ~50 ms for the MLP, "
          f"{conv_blocks} of one call for Conv4's meta-gradients and evaluation) after 3 warm-up calls")
    share = CpuShare().start()
    bench_mlp(0.05, mlp_blocks)
    bench_conv4(0.0, conv_blocks, 4 if args.quick else None)
    share.stop()
    print("\nms = median wall time per call (a meta-gradient: every task's adaptation and the backward through it; "
          "an evaluation: every step's forward and gradient);\ntraced/wo, fcall/wo = time of the user's module "
          "traced / through functional_call, over the built-in model's written-out forward in the same block, median "
          "over blocks (1.00x: as fast).")
    print(share.report())


if __name__ == "__main__":
    main()
