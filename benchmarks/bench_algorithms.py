"""What each meta-learning algorithm (``maml.algorithm``, MAML++'s options) costs an agent per iteration, next to
learn2learn's pattern for the same algorithm, written out (learn2learn 0.2.0 does not build on Python 3.11).

Per algorithm, on Conv4 Omniglot 5-way 1-shot (meta-batch 16, one query per class, alpha 0.4, as the agents train
it) or the sinusoid MLP: the project's update direction (``learning.algorithms``, the path ``auto`` takes) and the
learn2learn pattern — MAML/FOMAML: clone the module, adapt the clone with ``autograd.grad`` (``create_graph`` for
second order), backward of the query loss; ANIL: the body's features of the support and the query set, a cloned
head adapted on them; Meta-SGD: a learned rate per parameter multiplying each inner gradient; Reptile: SGD steps
on a detached copy, ``w - phi`` accumulated into ``.grad``. Every pair is first checked in float64 (the two must
agree to 1e-10 relative, or the benchmark aborts); then all are timed in float32 in this one process, interleaved
(``bench_peers.time_methods``), and each one's peak memory growth over 3 calls is measured in its own subprocess.

    .venv/bin/python benchmarks/bench_algorithms.py                 # Conv4 Omniglot 5w1s (~6 min on 2 cores)
    .venv/bin/python benchmarks/bench_algorithms.py --quick --workload sinusoid-5
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_peers, _cpu_share

import torch  # noqa: E402
from _cpu_share import CpuShare  # noqa: E402
from bench_peers import (  # noqa: E402
    WORKLOADS,
    Workload,
    _differentiable_clone,
    make_batch,
    peer_module,
    print_peak_growth,
    project_module,
    time_methods,
)
from torch import nn  # noqa: E402

from dif_maml_dist.config import MamlConfig  # noqa: E402
from dif_maml_dist.learning import functional  # noqa: E402
from dif_maml_dist.learning.algorithms import build_algorithm, choose_path  # noqa: E402
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss  # noqa: E402

#: name -> the MamlConfig fields of the algorithm (alpha and the inner steps come from the workload)
ALGORITHMS = {"maml": {}, "fomaml": {"first_order": True}, "anil": {"algorithm": "anil"},
              "metasgd": {"algorithm": "metasgd"}, "reptile": {"algorithm": "reptile"}}
TOLERANCE = 1e-10
Call = Callable[[], torch.Tensor]


def project_call(name: str, w: Workload, module: nn.Module, batch: TaskBatch) -> Call:
    """The project's update direction for ``name`` (flat, learned rates last), by the path ``auto`` takes."""
    fm = functional.functional(module)
    algorithm = build_algorithm(MamlConfig(inner_lr=w.inner_lr, inner_steps=w.inner_steps, **ALGORITHMS[name]),
                                fm.layout)
    weights = fm.layout.flatten(dict(module.named_parameters())).detach()
    rates = algorithm.inner.initial_rates(weights.dtype, weights.device)
    views = algorithm.inner.layout.split(torch.cat([weights, rates]))
    losses = Losses(make_loss(fm.forward, w.criterion), make_loss(fm.first_order_forward, w.criterion),
                    make_loss(fm.batched_forward, w.criterion))
    path = choose_path("auto", fm.kind, len(batch))
    return lambda: algorithm.inner.layout.join(algorithm.meta_gradient(path, losses, views, batch, 1)[0])


def l2l_call(name: str, w: Workload, net: nn.Module, batch: TaskBatch) -> Call:
    """learn2learn's pattern for ``name`` on a plain module with the same weights; returns the flat ``.grad``
    (Meta-SGD: the weights' then the rates')."""
    xs, ys, xq, yq = batch.tensors()
    n, crit, alpha = len(batch), w.criterion, w.inner_lr
    params = list(net.parameters())
    rates = [torch.full_like(p, alpha, requires_grad=True) for p in params] if name == "metasgd" else []
    body, head = nn.Sequential(*list(net)[:-1]), net[-1]

    def step(module: nn.Module, loss: torch.Tensor, create_graph: bool, lrs=None) -> None:
        slots = [(m, k) for m in module.modules() for k, p in m._parameters.items() if p is not None]
        grads = torch.autograd.grad(loss, [m._parameters[k] for m, k in slots], create_graph=create_graph)
        for i, ((m, k), g) in enumerate(zip(slots, grads)):
            m._parameters[k] = m._parameters[k] - (alpha if lrs is None else lrs[i]) * g

    def run() -> torch.Tensor:
        net.zero_grad()
        for r in rates:
            r.grad = None
        for t in range(n):
            if name == "reptile":
                learner = copy.deepcopy(net)
                sgd = torch.optim.SGD(learner.parameters(), lr=alpha)
                for _ in range(w.inner_steps):
                    sgd.zero_grad()
                    crit(learner(xs[t]), ys[t]).backward()
                    sgd.step()
                with torch.no_grad():
                    for p, q in zip(params, learner.parameters()):
                        p.grad = (p - q) / n if p.grad is None else p.grad + (p - q) / n
                continue
            if name == "anil":
                support, query = body(xs[t]), body(xq[t])
                learner = _differentiable_clone(head)
                for _ in range(w.inner_steps):
                    step(learner, crit(learner(support), ys[t]), create_graph=True)
                (crit(learner(query), yq[t]) / n).backward()
                continue
            learner = _differentiable_clone(net)
            for _ in range(w.inner_steps):
                step(learner, crit(learner(xs[t]), ys[t]), create_graph=name != "fomaml", lrs=rates or None)
            (crit(learner(xq[t]), yq[t]) / n).backward()
        return torch.cat([p.grad.reshape(-1) for p in params] + [r.grad.reshape(-1) for r in rates])

    return run


def calls_for(name: str, w: Workload, dtype: torch.dtype, batch: TaskBatch) -> dict[str, Call]:
    project = project_module(w).to(dtype)
    return {f"{name}": project_call(name, w, project, batch),
            f"{name} l2l": l2l_call(name, w, peer_module(w, project), batch)}


def check_float64(w: Workload, names: list[str]) -> dict[str, float]:
    """Each algorithm's relative difference between the project and the pattern, in float64."""
    batch = make_batch(w).to(dtype=torch.float64)
    out = {}
    for name in names:
        project, pattern = calls_for(name, w, torch.float64, batch).values()
        a, b = project(), pattern()
        out[name] = float((a - b).norm() / b.norm())
        if not out[name] <= TOLERANCE:
            sys.exit(f"ABORT: {name}: the project and learn2learn's pattern disagree in float64 ({out[name]:.1e})")
    return out


def memory_probe(workload: str, method: str) -> None:
    """In a fresh process: peak RSS growth (MiB) over bench_peers.PROBE_CALLS calls of ``method``, one JSON
    line."""
    w = WORKLOADS[workload]
    print_peak_growth(lambda: calls_for(method.removesuffix(" l2l"), w, torch.float32, make_batch(w))[method])


def measure_memory(workload: str, methods: list[str], threads: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in methods:  # one at a time, on an otherwise idle machine
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", workload, m, "--threads",
               str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = proc.stdout.strip().splitlines()
        res = json.loads(lines[-1]) if lines else {"error": f"n/a: probe exit {proc.returncode}"}
        out[m] = res.get("mib", res.get("error"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="omniglot-5w1s-q1", choices=sorted(WORKLOADS))
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: one agent per core, as trained)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter timing blocks")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--memory-probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    w = WORKLOADS[args.workload]
    print(f"{args.workload}: {w.describe()}; {args.threads} thread(s); float32 timing, float64 check")
    check = check_float64(w, args.algorithms)
    block_s, rounds = (0.05, 3) if args.quick else (0.2, 7)
    with CpuShare() as share:
        calls: dict[str, Call] = {}
        batch = make_batch(w)
        for name in args.algorithms:
            calls.update(calls_for(name, w, torch.float32, batch))
        times = time_methods(calls, block_s, rounds)
        mems = {} if args.no_memory else measure_memory(args.workload, list(calls), args.threads)
    base = times.get("maml")
    head = (f"{'algorithm':<10} {'ms/iteration':>12} {'vs MAML':>8} {'l2l pattern ms':>14} {'l2l/this':>9} "
            f"{'MiB':>7} {'l2l MiB':>8} {'f64 diff':>9}")
    print(head + "\n" + "-" * len(head))
    for name in args.algorithms:
        t, p = times[name], times[f"{name} l2l"]
        m, pm = mems.get(name, "-"), mems.get(f"{name} l2l", "-")

        def fmt(v, spec, width):
            return f"{format(v, spec) if isinstance(v, float) else str(v):>{width}}"

        speed = f"{base / t:7.2f}x" if isinstance(t, float) and isinstance(base, float) else f"{'-':>8}"
        ratio = f"{p / t:8.2f}x" if isinstance(t, float) and isinstance(p, float) else f"{'-':>9}"
        print(f"{name:<10} {fmt(t * 1e3 if isinstance(t, float) else t, '.1f', 12)} {speed} "
              f"{fmt(p * 1e3 if isinstance(p, float) else p, '.1f', 14)} {ratio} {fmt(m, '.0f', 7)} "
              f"{fmt(pm, '.0f', 8)} {check[name]:9.1e}")
    print("ms/iteration: one update direction over the meta-batch (the agent's compute without the optimizer step); "
          "vs MAML: MAML's time / this one's (iterations per second relative to MAML); l2l/this > 1: the project "
          "is faster than learn2learn's pattern; MiB: peak memory growth over 3 calls")
    print(share.report())


if __name__ == "__main__":
    main()
