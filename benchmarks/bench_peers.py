"""The project's second-order MAML meta-gradient next to peer libraries, on identical weights and inputs.

Methods: the project's meta-gradient (``learning.algorithms``: ``build_algorithm(...).meta_gradient``; ``auto``
path, plus the explicit ``loop`` and ``vmap`` paths), TorchOpt (``MetaSGD``), higher (``innerloop_ctx``), the
learn2learn pattern (clone, adapt, backward; written out here) and plain ``torch.func`` (grad of a vmap over
tasks). Per workload: every method's meta-gradient is first compared in float64 with the project's loop path;
then all methods are timed in float32 in this one process, interleaved (2 warm-up calls each, then rounds of
~0.2 s blocks in rotating order; median over rounds of the time per call); then each method's peak memory growth
over 3 calls is measured in its own subprocess.

    .venv/bin/python benchmarks/bench_peers.py                     # every workload (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_peers.py --quick --workloads sinusoid-1 omniglot-5w1s-q1
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _cpu_share

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)
from torch import nn  # noqa: E402

from dif_maml_dist.config import MamlConfig  # noqa: E402
from dif_maml_dist.learning import functional, models  # noqa: E402
from dif_maml_dist.learning.algorithms import build_algorithm, choose_path  # noqa: E402
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss  # noqa: E402

TOLERANCE = 1e-6  # float64 relative difference above which a method counts as disagreeing
PROBE_CALLS = 3


@dataclass(frozen=True)
class Workload:
    kind: str  # mlp | conv4
    tasks: int
    inner_lr: float
    inner_steps: int
    channels: int = 1
    size: int = 28
    filters: int = 64
    way: int = 5
    shot: int = 1
    query: int = 1
    check_tasks: Optional[int] = None  # tasks in the float64 check (None: all)

    @property
    def criterion(self):
        return F.mse_loss if self.kind == "mlp" else F.cross_entropy

    def describe(self) -> str:
        if self.kind == "mlp":
            return (f"sinusoid MLP 1-40-40-1, {self.tasks} task(s) x (10 support + 10 query points), "
                    f"{self.inner_steps} inner step, alpha {self.inner_lr}, MSE")
        return (f"Conv4 {self.filters} filters on {self.channels}x{self.size}x{self.size}, {self.way}-way "
                f"{self.shot}-shot, {self.query} query/class, {self.tasks} tasks, {self.inner_steps} inner step(s), "
                f"alpha {self.inner_lr}, cross-entropy")


WORKLOADS = {
    **{f"sinusoid-{n}": Workload("mlp", n, 0.01, 1) for n in (1, 5, 25, 100)},
    "omniglot-5w1s-q1": Workload("conv4", 16, 0.4, 1, query=1),
    # The float64 vmap paths over all 16 tasks of 80 images would need ~10 GB; 4 tasks check the same code.
    "omniglot-5w1s-q15": Workload("conv4", 16, 0.4, 1, query=15, check_tasks=4),
    "miniimagenet-5w1s": Workload("conv4", 4, 0.01, 5, channels=3, size=84, filters=32, query=10, check_tasks=1),
}
PROJECT = ("project auto", "project loop", "project vmap")
PEERS = ("torchopt", "higher", "l2l-style", "torch.func")
METHODS = PROJECT + PEERS


# ------------------------------------------------------------------------------------------------- inputs
def make_batch(w: Workload, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    n = w.tasks
    if w.kind == "mlp":
        amp = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(n, 1, 1).uniform_(0.0, math.pi, generator=g)
        xs, xq = (torch.empty(n, 10, 1).uniform_(-5.0, 5.0, generator=g) for _ in range(2))
        return TaskBatch(xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))

    def images(per: int) -> torch.Tensor:
        return torch.rand(n, w.way * per, w.channels, w.size, w.size, generator=g)

    def labels(per: int) -> torch.Tensor:
        return torch.arange(w.way).repeat_interleave(per).repeat(n, 1)

    return TaskBatch(images(w.shot), labels(w.shot), images(w.query), labels(w.query))


def project_module(w: Workload) -> nn.Module:
    m = models.MLP(1, [40, 40], 1) if w.kind == "mlp" else models.Conv4(w.channels, w.way, w.filters, w.size)
    models.reset_parameters(m, torch.Generator().manual_seed(0))
    return m


def peer_module(w: Workload, project: nn.Module) -> nn.Module:
    """A plain torch module with the project module's parameter names, order and weights."""
    if w.kind == "mlp":
        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    else:
        layers: list[nn.Module] = []
        channels, size = w.channels, w.size
        for _ in range(4):
            layers += [nn.Conv2d(channels, w.filters, 3, padding=1),
                       nn.BatchNorm2d(w.filters, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = w.filters, size // 2
        net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(w.filters * size * size, w.way))
    net.to(next(project.parameters()).dtype).load_state_dict(project.state_dict())
    return net


# ------------------------------------------------------------------------------------------------ methods
# Each factory does its set-up once and returns the call that is timed: one full meta-gradient, returned as
# a list of per-parameter tensors (the peers' .grad, read without copying) or the project's flat vector.
Call = Callable[[], object]


def project_call(path: str, w: Workload, project: nn.Module, batch: TaskBatch) -> Call:
    fm = functional.functional(project)
    flat = fm.layout.flatten(dict(project.named_parameters())).detach()
    views = fm.layout.split(flat)
    loss = make_loss(fm.forward, w.criterion)
    query_loss = make_loss(fm.first_order_forward, w.criterion)  # as the agents run it (engine/learner.py)
    batched_loss = make_loss(fm.batched_forward, w.criterion)
    losses = Losses(loss, query_loss, batched_loss)  # loop: loss and query_loss; vmap: batched_loss
    alg = build_algorithm(MamlConfig(inner_lr=w.inner_lr, inner_steps=w.inner_steps, first_order=False), fm.layout)

    def auto():
        chosen = choose_path("auto", fm.kind, len(batch))
        grads, _ = alg.meta_gradient(chosen, losses, views, batch, 1)
        return fm.layout.join(grads)

    def loop():
        return fm.layout.join(alg.meta_gradient("loop", losses, views, batch, 1)[0])

    def vmap():
        return fm.layout.join(alg.meta_gradient("vmap", losses, views, batch, 1)[0])

    return {"auto": auto, "loop": loop, "vmap": vmap}[path]


def torchopt_call(w: Workload, net: nn.Module, batch: TaskBatch) -> Call:
    import torchopt

    opt = torchopt.MetaSGD(net, lr=w.inner_lr)
    xs, ys, xq, yq = batch.tensors()
    n, crit = len(batch), w.criterion

    def run():
        net.zero_grad()
        # As TorchOpt's MAML example: references to the initial weights and optimizer state, restored after
        # each task (MetaSGD.step replaces the module's parameters by the adapted, non-leaf tensors).
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(opt, by="reference")
        for t in range(n):
            for _ in range(w.inner_steps):
                opt.step(crit(net(xs[t]), ys[t]))
            (crit(net(xq[t]), yq[t]) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(opt, opt_state)
        return [p.grad for p in net.parameters()]

    return run


def higher_call(w: Workload, net: nn.Module, batch: TaskBatch) -> Call:
    import higher

    inner_opt = torch.optim.SGD(net.parameters(), lr=w.inner_lr)
    xs, ys, xq, yq = batch.tensors()
    n, crit = len(batch), w.criterion

    def run():
        net.zero_grad()
        for t in range(n):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(w.inner_steps):
                    diffopt.step(crit(fnet(xs[t]), ys[t]))
                (crit(fnet(xq[t]), yq[t]) / n).backward()
        return [p.grad for p in net.parameters()]

    return run


def _differentiable_clone(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters are ``p.clone()``: still functions of the originals, so a
    backward through the clone reaches the original parameters' ``.grad``."""
    clone = copy.copy(module)  # a new __dict__; the containers below would otherwise still be shared
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._modules = {k: None if m is None else _differentiable_clone(m) for k, m in module._modules.items()}
    return clone


def l2l_call(w: Workload, net: nn.Module, batch: TaskBatch) -> Call:
    xs, ys, xq, yq = batch.tensors()
    n, crit = len(batch), w.criterion

    def adapt(clone: nn.Module, loss: torch.Tensor) -> None:
        slots = [(m, k) for m in clone.modules() for k, p in m._parameters.items() if p is not None]
        grads = torch.autograd.grad(loss, [m._parameters[k] for m, k in slots], create_graph=True)
        for (m, k), g in zip(slots, grads):
            m._parameters[k] = m._parameters[k] - w.inner_lr * g

    def run():
        net.zero_grad()
        for t in range(n):
            learner = _differentiable_clone(net)
            for _ in range(w.inner_steps):
                adapt(learner, crit(learner(xs[t]), ys[t]))
            (crit(learner(xq[t]), yq[t]) / n).backward()
        return [p.grad for p in net.parameters()]

    return run


def torch_func_call(w: Workload, net: nn.Module, batch: TaskBatch) -> Call:
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in net.named_parameters()}
    crit = w.criterion

    def task_loss(p, x, y):
        return crit(functional_call(net, p, (x,)), y)

    def task_meta_loss(p, xs, ys, xq, yq):
        for _ in range(w.inner_steps):
            g = grad(task_loss)(p, xs, ys)
            p = {k: p[k] - w.inner_lr * g[k] for k in p}
        return task_loss(p, xq, yq)

    meta_grad = grad(lambda p, *b: vmap(task_meta_loss, in_dims=(None, 0, 0, 0, 0))(p, *b).mean())

    def run():
        return list(meta_grad(params, *batch.tensors()).values())

    return run


def build(method: str, w: Workload, project: nn.Module, batch: TaskBatch) -> Call:
    """``method``'s timed call on its own copy of the weights (``project``'s dtype)."""
    if method in PROJECT:
        return project_call(method.split()[1], w, project, batch)
    factory = {"torchopt": torchopt_call, "higher": higher_call, "l2l-style": l2l_call,
               "torch.func": torch_func_call}[method]
    return factory(w, peer_module(w, project), batch)


def flat_of(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result.detach().reshape(-1)
    return torch.cat([g.detach().reshape(-1) for g in result])


def reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "n/a: " + (text if len(text) <= 60 else text[:57] + "...")


# ----------------------------------------------------------------------------------------------- measures
def check_float64(w: Workload, methods: list[str]) -> tuple[dict[str, object], int]:
    """Relative difference of each method's float64 meta-gradient to the project loop's (float, or a reason)."""
    n = w.check_tasks or w.tasks
    project = project_module(w).double()
    batch = make_batch(w).slice(0, n).to(dtype=torch.float64)
    ref = flat_of(build("project loop", w, project, batch)())
    out: dict[str, object] = {}
    for m in methods:
        try:
            g = flat_of(build(m, w, project, batch)())
            out[m] = float((g - ref).norm() / ref.norm())
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a table cell, not the end of the run
            out[m] = reason(exc)
    return out, n


def time_methods(calls: dict[str, Call], block_s: float, rounds: int) -> dict[str, object]:
    """Median seconds per call over interleaved rounds (a reason string for a method that failed)."""
    per_call: dict[str, float] = {}
    failed: dict[str, object] = {}
    for name, fn in calls.items():
        try:
            fn()
            t0 = time.perf_counter()
            fn()  # the second warm-up call sizes the blocks
            per_call[name] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            failed[name] = reason(exc)
    names = list(per_call)
    reps = {m: max(1, round(block_s / per_call[m])) for m in names}
    samples: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds if names else 0):
        for m in names[r % len(names):] + names[:r % len(names)]:
            if m in failed:
                continue
            try:
                t0 = time.perf_counter()
                for _ in range(reps[m]):
                    calls[m]()
                samples[m].append((time.perf_counter() - t0) / reps[m])
            except Exception as exc:  # noqa: BLE001
                failed[m] = reason(exc)
    return {m: failed.get(m, statistics.median(samples[m]) if samples.get(m) else "n/a") for m in calls}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _load_lazy_modules() -> None:
    """The first torch.func transform imports ~900 modules (~160 MiB, torch._dynamo and friends): a one-off cost
    of the process, not of a meta-gradient, so a tiny transform loads them before the baseline, for every method."""
    x = torch.ones(2, requires_grad=True)
    torch.func.grad(lambda v: torch.vmap(torch.sin)(v).sum())(x.detach())
    torch.autograd.grad(torch.autograd.grad(x.sin().sum(), x, create_graph=True)[0].sum(), x)


def memory_probe(workload: str, method: str) -> None:
    """In a fresh process: peak RSS growth (MiB) over PROBE_CALLS calls, printed as one JSON line.

    The peak is this process's own high-water mark (VmHWM), reset just before the calls, not getrusage's
    ru_maxrss: Linux carries ru_maxrss over an execve from the parent (here the benchmark itself, whose float64
    checks peak at GBs), so a child's ru_maxrss starts at its parent's peak.
    """
    w = WORKLOADS[workload]
    print_peak_growth(lambda: build(method, w, project_module(w), make_batch(w)))


def print_peak_growth(make: Callable[[], Call]) -> None:
    """Peak RSS growth (MiB) over PROBE_CALLS calls of the call ``make()`` builds, printed as one JSON line (or the
    reason it failed)."""
    try:
        fn = make()
        _load_lazy_modules()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS: leaves out import and set-up transients
        except OSError:
            pass
        base = _status_kib("VmRSS")
        for _ in range(PROBE_CALLS):
            fn()
        print(json.dumps({"mib": max(0, _status_kib("VmHWM") - base) / 1024}))
    except Exception as exc:  # noqa: BLE001
        print(json.dumps({"error": reason(exc)}))


def measure_memory(workload: str, methods: list[str], threads: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in methods:  # one at a time: concurrent probes would also contend for the 2 cores
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", workload, m, "--threads", str(threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            lines = proc.stdout.strip().splitlines()
            res = json.loads(lines[-1]) if lines else {"error": f"n/a: probe exit {proc.returncode}"}
            out[m] = res.get("mib", res.get("error"))
        except Exception as exc:  # noqa: BLE001
            out[m] = reason(exc)
    return out


# ------------------------------------------------------------------------------------------------- report
def best_peer(values: dict[str, object], check: dict[str, object], smallest: bool = True):
    """(peer, value) of the agreeing peer with the smallest figure, or (None, None)."""
    ok = {p: values[p] for p in PEERS if isinstance(values.get(p), float)
          and isinstance(check.get(p), float) and check[p] <= TOLERANCE}
    if not ok:
        return None, None
    p = min(ok, key=ok.get) if smallest else max(ok, key=ok.get)
    return p, ok[p]


def cell(value, fmt: str, width: int) -> str:
    text = format(value, fmt) if isinstance(value, float) else str(value)
    return f"{text:>{width}}"


def print_table(name: str, w: Workload, auto_path: str, times: dict, mems: dict, check: dict,
                check_tasks: int) -> tuple[Optional[float], Optional[float], str, str]:
    fast_peer, fast_t = best_peer(times, check)
    lean_peer, lean_m = best_peer(mems, check)
    print(f"\n{name}: {w.describe()}")
    head = (f"  {'method':<22} {'ms/meta-grad':>12} {'fastest peer/this':>17} {'peak MiB':>9} "
            f"{'this/leanest':>12} {'f64 rel diff':>13}")
    print(head)
    print("  " + "-" * (len(head) - 2))
    notes = []
    for m in METHODS:
        label = f"{m} ({auto_path})" if m == "project auto" else m
        t, mem, d = times.get(m, "-"), mems.get(m, "-"), check.get(m, "-")
        ms = t * 1e3 if isinstance(t, float) else t
        speed = fast_t / t if isinstance(t, float) and fast_t else "-"
        mem_ratio = mem / lean_m if isinstance(mem, float) and lean_m else "-"
        flag = ""
        if isinstance(d, float) and d > TOLERANCE:
            flag = "  DISAGREES"
        row = (f"  {label:<22} {cell(ms, '.3f', 12)} {cell(speed, '.2f', 16)}{'x' if isinstance(speed, float) else ' '}"
               f" {cell(mem, '.1f', 9)} {cell(mem_ratio, '.2f', 11)}{'x' if isinstance(mem_ratio, float) else ' '}"
               f" {cell(d, '.1e', 13)}{flag}")
        for value in (t, mem, d):  # long failure reasons go below the table, not into a cell
            if isinstance(value, str) and value.startswith("n/a"):
                notes.append(f"  {label}: {value}")
        print(row)
    print(f"  fastest agreeing peer: {fast_peer or 'none'}; leanest agreeing peer: {lean_peer or 'none'}; "
          f"float64 check over {check_tasks} of {w.tasks} task(s)"
          + (" (float64 memory bound)" if check_tasks < w.tasks else ""))
    for line in dict.fromkeys(notes):
        print(line)
    auto_t, auto_m = times.get("project auto"), mems.get("project auto")
    speed = fast_t / auto_t if isinstance(auto_t, float) and fast_t else None
    mem_ratio = auto_m / lean_m if isinstance(auto_m, float) and lean_m else None
    return speed, mem_ratio, fast_peer or "none", lean_peer or "none"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of ~0.05 s blocks (default 7 of ~0.2 s)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="NAME",
                   help=f"any of: {' '.join(WORKLOADS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak memory subprocesses")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--memory-probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    block_s, rounds = (0.05, 3) if args.quick else (0.2, 7)
    print(f"MAML meta-gradient vs peers: torch {torch.__version__}, {args.threads} thread(s), "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPU(s), "
          f"python {platform.python_version()}")
    print(f"second order; timed in float32: median over {rounds} interleaved rounds of ~{block_s * 1e3:.0f} ms blocks "
          f"per method after 2 warm-up calls; peak memory: "
          + ("skipped" if args.no_memory else f"RSS growth over {PROBE_CALLS} calls, one subprocess per method")
          + f"; checked in float64 against project loop (disagrees above {TOLERANCE:g})")
    share = CpuShare().start()
    summary = []
    for name in args.workloads:
        w = WORKLOADS[name]
        print(f"[{name}] float64 check ...", file=sys.stderr, flush=True)
        check, check_tasks = check_float64(w, list(METHODS))
        print(f"[{name}] timing ...", file=sys.stderr, flush=True)
        project, batch = project_module(w), make_batch(w)
        calls, times = {}, {}
        for m in METHODS:
            try:
                calls[m] = build(m, w, project, batch)
            except Exception as exc:  # noqa: BLE001
                times[m] = reason(exc)
        times.update(time_methods(calls, block_s, rounds))
        mems: dict[str, object] = {}
        if not args.no_memory:
            print(f"[{name}] memory probes ...", file=sys.stderr, flush=True)
            mems = measure_memory(name, list(METHODS), args.threads)
        auto_path = choose_path("auto", w.kind, w.tasks)
        summary.append((name, *print_table(name, w, auto_path, times, mems, check, check_tasks)))
    share.stop()

    print("\nms = median wall time of one meta-gradient (peers: zero_grad, every task's adaptation and backward; "
          "project: meta_gradient + layout.join);")
    print("fastest peer/this > 1: faster than the fastest agreeing peer; this/leanest < 1: less memory than the "
          "leanest agreeing peer;")
    print(f"f64 rel diff = ||g - g_loop|| / ||g_loop|| in float64 (g_loop: project loop); above {TOLERANCE:g} a "
          "method is marked DISAGREES and left out of 'fastest'/'leanest peer'.\n")
    print("summary (time: fastest peer ms / project auto ms; memory: project auto MiB / leanest peer MiB):")
    for name, speed, mem_ratio, fast_peer, lean_peer in summary:
        t = f"{speed:.2f}x time" if speed is not None else "n/a time"
        m = f"{mem_ratio:.2f}x memory" if mem_ratio is not None else "n/a memory"
        print(f"  {name:<20} project auto vs fastest peer: {t}, {m}  (fastest: {fast_peer}, leanest: {lean_peer})")
    print(share.report())


if __name__ == "__main__":
    main()
