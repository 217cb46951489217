"""Time one MAML meta-gradient, per-task loop vs torch.func vmap, across meta-batch sizes.

The sinusoid learner of the paper: MLP 1-40-40-1, float32, 10 support + 10 query points per task, one inner
SGD step with alpha = 0.01. For every meta-batch size both paths of MAML's meta-gradient
(``dif_maml_dist.learning.algorithms``: ``build_algorithm(...).meta_gradient("loop" | "vmap", ...)``) are first
checked to agree (``torch.allclose``), then timed side by side: blocks of calls are interleaved between the paths
and the median of the per-call times over the blocks is reported. The last lines give the measured crossover (the
smallest meta-batch from which vmap is faster) and compare it with the config default ``maml.vmap_min_tasks``.

    .venv/bin/python benchmarks/bench_meta_gradient.py            # full run (about 45 s on 2 cores)
    .venv/bin/python benchmarks/bench_meta_gradient.py --quick    # fewer, shorter blocks (about 8 s)
    .venv/bin/python benchmarks/bench_meta_gradient.py --threads 2 --sizes 1 4 25
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _cpu_share

import torch  # noqa: E402
from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

from dif_maml_dist import seeding  # noqa: E402
from dif_maml_dist.config import Config, MamlConfig  # noqa: E402
from dif_maml_dist.engine.agent import initial_params  # noqa: E402
from dif_maml_dist.learning.algorithms import (  # noqa: E402
    AUTO_VMAP_FROM,
    META_GRADIENT_PATHS,
    Algorithm,
    build_algorithm,
)
from dif_maml_dist.learning.batch import Losses, make_loss  # noqa: E402
from dif_maml_dist.learning.functional import functional  # noqa: E402
from dif_maml_dist.tasks import (
    SinusoidTasks,  # noqa: E402
    task_family,  # noqa: E402
)

SIZES = (1, 2, 3, 4, 5, 8, 25, 100)
PATHS = META_GRADIENT_PATHS  # ("loop", "vmap")
RTOL, ATOL = 1e-4, 1e-6  # float32; the two paths sum in different orders


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer and shorter timing blocks")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: one agent process per core slice, as in training)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="meta-batch sizes to time")
    p.add_argument("--no-first-order", action="store_true", help="skip the first-order (FO-MAML) columns")
    return p.parse_args(argv)


def maml(layout, inner_lr: float, inner_steps: int, first_order: bool) -> Algorithm:
    """Plain MAML (second order unless ``first_order``) for a model with parameters ``layout``."""
    return build_algorithm(MamlConfig(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order), layout)


def check_agree(alg: Algorithm, losses: Losses, params, batch, first_order: bool) -> float:
    """Both paths give the same meta-gradient and loss; returns the max abs gradient difference. Exits if not."""
    g_loop, l_loop = alg.meta_gradient("loop", losses, params, batch, 1)
    g_vmap, l_vmap = alg.meta_gradient("vmap", losses, params, batch, 1)
    g_loop, g_vmap = torch.cat([g.reshape(-1) for g in g_loop]), torch.cat([g.reshape(-1) for g in g_vmap])
    diff = (g_loop - g_vmap).abs().max().item()
    if not (torch.allclose(g_loop, g_vmap, rtol=RTOL, atol=ATOL)
            and torch.allclose(l_loop, l_vmap, rtol=RTOL, atol=ATOL)):
        order = "first-order" if first_order else "second-order"
        sys.exit(f"ABORT: the loop and vmap meta-gradient paths disagree ({order}, meta-batch {len(batch)}): "
                 f"max |grad diff| = {diff:.3e} (|grad|max = {g_loop.abs().max().item():.3e}), "
                 f"loss {l_loop.item():.6g} vs {l_vmap.item():.6g}; rtol={RTOL}, atol={ATOL}. Timing skipped.")
    return diff


def time_pair(calls: dict, block_s: float, blocks: int) -> dict[str, float]:
    """Median seconds per call for each callable; blocks of calls are interleaved between the callables."""
    return {name: statistics.median(s) for name, s in time_blocks(calls, block_s, blocks).items()}


def time_blocks(calls: dict, block_s: float, blocks: int) -> dict[str, list[float]]:
    """Seconds per call for each callable, one figure per block; block ``i`` of every callable ran one after
    another, so same-index figures saw about the same load on a shared machine."""
    for fn in calls.values():  # warm-up (first vmap trace, allocator)
        for _ in range(3):
            fn()
    reps = {}
    for name, fn in calls.items():  # calibrate: calls per block so that a block lasts about block_s
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < block_s / 2 or n < 2:
            fn()
            n += 1
        per_call = (time.perf_counter() - t0) / n
        reps[name] = max(1, round(block_s / per_call))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(blocks):
        for name, fn in calls.items():
            r = reps[name]
            t0 = time.perf_counter()
            for _ in range(r):
                fn()
            samples[name].append((time.perf_counter() - t0) / r)
    return samples


def crossover(sizes: list[int], loop_ms: list[float], vmap_ms: list[float]) -> tuple[int | None, int | None]:
    """(first size where vmap wins, smallest size from which vmap wins at every larger measured size)."""
    wins = [v < lo for lo, v in zip(loop_ms, vmap_ms)]
    first = next((s for s, w in zip(sizes, wins) if w), None)
    stable = None
    for i in range(len(sizes) - 1, -1, -1):
        if not wins[i]:
            break
        stable = sizes[i]
    return first, stable


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    block_s, blocks = (0.01, 9) if args.quick else (0.05, 25)
    orders = [False] if args.no_first_order else [False, True]
    sizes = sorted(set(args.sizes))

    cfg = Config()
    fm = functional(task_family(cfg).build_model())
    layout = fm.layout
    loss = make_loss(fm.forward)  # the MLP's forward is exact under vmap too
    losses = Losses(loss, loss, loss)  # the MLP's per-task, query and vmap-exact forwards are one
    flat = layout.split(initial_params(cfg, 0, torch.float32, torch.device("cpu")))
    m = cfg.maml
    print(f"MAML meta-gradient, sinusoid MLP 1-{'-'.join(map(str, cfg.model.hidden))}-1 ({layout.numel} parameters), "
          f"float32, {cfg.task.num_support} support + {cfg.task.num_query} query points, "
          f"{m.inner_steps} inner step, alpha={m.inner_lr}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), python {platform.python_version()}, "
          f"{'quick' if args.quick else 'full'} mode: median of {blocks} interleaved blocks of ~{block_s * 1e3:.0f} ms "
          f"per path\n")

    share = CpuShare().start()
    results: dict[bool, tuple[list[float], list[float]]] = {fo: ([], []) for fo in orders}
    rows = []
    for n in sizes:
        batch = SinusoidTasks(cfg.task).sample(seeding.generator(0, 99), n).to(dtype=torch.float32)
        row = [n]
        for fo in orders:
            alg = maml(layout, m.inner_lr, m.inner_steps, fo)
            diff = check_agree(alg, losses, flat, batch, fo)
            calls = {name: (lambda name=name, alg=alg: alg.meta_gradient(name, losses, flat, batch, 1))
                     for name in PATHS}
            t = time_pair(calls, block_s, blocks)
            lo_ms, vm_ms = t["loop"] * 1e3, t["vmap"] * 1e3
            results[fo][0].append(lo_ms)
            results[fo][1].append(vm_ms)
            row += [lo_ms, vm_ms, lo_ms / vm_ms, "vmap" if vm_ms < lo_ms else "loop", diff]
        rows.append(row)

    share.stop()
    # ---- table
    groups = [("second order", False)] + ([("first order (FO-MAML)", True)] if True in orders else [])
    cell = ["loop ms", "vmap ms", "loop/vmap", "faster", "max|dg|"]
    widths = [9, 9, 10, 7, 9]
    head1 = f"{'':>6} |" + " |".join(f" {title:^{sum(widths) + len(widths) - 1}}" for title, _ in groups)
    head2 = f"{'tasks':>6} |" + " |".join(" " + " ".join(f"{c:>{w}}" for c, w in zip(cell, widths)) for _ in groups)
    print(head1)
    print(head2)
    print("-" * len(head2))
    for row in rows:
        parts = []
        for g in range(len(groups)):
            lo_ms, vm_ms, ratio, faster, diff = row[1 + 5 * g: 6 + 5 * g]
            parts.append(f" {lo_ms:>9.3f} {vm_ms:>9.3f} {ratio:>9.2f}x {faster:>7} {diff:>9.1e}")
        print(f"{row[0]:>6} |" + " |".join(parts))
    print("-" * len(head2))
    print("ms = median wall time of one meta-gradient (forward, inner step, backward through it); "
          "loop/vmap > 1 means vmap is faster;")
    print(f"max|dg| = largest |loop - vmap| gradient entry (checked with torch.allclose rtol={RTOL}, atol={ATOL} "
          f"before timing).\n")

    for title, fo in groups:
        first, stable = crossover(sizes, *results[fo])
        if first is None:
            print(f"{title}: vmap never wins at the measured sizes {sizes}.")
            continue
        note = "" if first == stable else f" (it first wins at {first}, but not at every larger size)"
        print(f"{title}: smallest meta-batch from which vmap wins: {stable}{note}.")
        if not fo:
            default = AUTO_VMAP_FROM["mlp"]
            prev = max((s for s in sizes if s < stable), default=0)
            if stable == default:
                verdict = "agrees"
            elif prev < default < stable:
                verdict = (f"is consistent with it (the crossover lies in {prev + 1}..{stable}; "
                           f"{default} itself was not measured)")
            elif stable < default:
                verdict = f"disagrees: vmap already wins from {stable} tasks"
            else:
                verdict = f"disagrees: the loop is still faster (or tied) at {prev} tasks"
            print(f"  algorithms.AUTO_VMAP_FROM['mlp'] = {default} (what meta_grad_path=auto uses): the measurement "
                  f"{verdict}.")
            near = [i for i, s in enumerate(sizes) if abs(results[fo][0][i] / results[fo][1][i] - 1) < 0.1]
            if near:
                print(f"  within 10% of a tie at {[sizes[i] for i in near]} tasks: the crossover there is "
                      f"noise-sensitive.")
    print(share.report())


if __name__ == "__main__":
    main()
