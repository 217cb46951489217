"""What compression costs an agent next to what it computes, on the Conv4 workload, side by side in one process.

For the Conv4 of Omniglot 5-way 1-shot (112,261 parameters, float32) and the sinusoid MLP (1,761), per compressor:
the payload bytes per message and the reduction against the full state; the time to encode one message and decode
it (the sender decodes its own message too, to update its copy) and the time of one whole compressed round at a
given degree (``ChocoGossip.outgoing`` + ``merge``: per neighbour one encode, two decodes and the copy updates),
against the full-state combine at the same degree; and, for Conv4, that round's share of one iteration's compute
(one second-order meta-gradient of 16 tasks, timed here on synthetic 28x28 images, plus the Adam step). One
thread, medians of interleaved blocks.

    .venv/bin/python benchmarks/bench_compression.py              # degree 4 (the paper graph's hub), ~1 min
    .venv/bin/python benchmarks/bench_compression.py --degree 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _cpu_share import CpuShare  # noqa: E402  (benchmarks/_cpu_share.py)

from dif_maml_dist.comm.transport import nbytes  # noqa: E402
from dif_maml_dist.config import CompressionConfig, Config, MamlConfig  # noqa: E402
from dif_maml_dist.gossip.schemes import FullStateGossip, make_gossip  # noqa: E402
from dif_maml_dist.graphs.weights import CombinePlan  # noqa: E402
from dif_maml_dist.learning import functional, models  # noqa: E402
from dif_maml_dist.learning.algorithms import build_algorithm  # noqa: E402
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss  # noqa: E402
from dif_maml_dist.learning.flat import FlatLayout  # noqa: E402

SETTINGS = {"none": {}, "topk 10%": {"name": "topk", "ratio": 0.1}, "topk 1%": {"name": "topk", "ratio": 0.01},
            "randk 10%": {"name": "randk", "ratio": 0.1}, "qsgd 4 bit": {"name": "qsgd", "bits": 4},
            "qsgd 2 bit": {"name": "qsgd", "bits": 2}, "sign": {"name": "sign"}}


def median_time(fn, block_s: float = 0.2, rounds: int = 7) -> float:
    """Median seconds per call over ``rounds`` blocks of ~``block_s`` each (after one warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < block_s:
            fn()
            n += 1
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def conv4_iteration_seconds() -> float:
    """One agent's compute per Omniglot 5w1s iteration: a second-order meta-gradient of 16 tasks (5 support and 5
    query images each) and an Adam step, on synthetic images."""
    module = models.Conv4(1, 5, 64, 28)
    fm = functional.functional(module)
    layout = FlatLayout.of(module)
    flat = layout.flatten(dict(module.named_parameters())).detach()
    opt = torch.optim.Adam([flat], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(16, 5, 1, 28, 28, generator=g), torch.randn(16, 5, 1, 28, 28, generator=g)
    ys = yq = torch.arange(5).repeat(16, 1)
    batch = TaskBatch(xs, ys, xq, yq)
    ce = torch.nn.functional.cross_entropy
    losses = Losses(make_loss(fm.forward, ce), make_loss(fm.first_order_forward, ce), make_loss(fm.batched_forward, ce))
    alg = build_algorithm(MamlConfig(inner_lr=0.4, inner_steps=1, first_order=False), fm.layout)

    def step():
        grads, _ = alg.meta_gradient("loop", losses, layout.split(flat), batch, 1)
        flat.grad = layout.join(grads)
        opt.step()
        flat.grad = None

    return median_time(step, block_s=1.0, rounds=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--degree", type=int, default=4, help="neighbours per round (paper6's hub has 4)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    share = CpuShare().start()
    iteration_s = conv4_iteration_seconds()
    print(f"Conv4 Omniglot 5w1s, one agent's compute per iteration (16-task second-order meta-gradient + Adam): "
          f"{iteration_s * 1e3:.0f} ms\n")
    for model, numel in (("Conv4 (Omniglot 5w1s)", 112261), ("sinusoid MLP", 1761)):
        print(f"{model}: P = {numel}, float32, degree {args.degree}")
        print(f"  {'compressor':<11} {'bytes/msg':>10} {'reduction':>9} {'enc+dec ms':>10} {'round ms':>9} "
              f"{'vs full':>8}" + (f" {'of iteration':>12}" if numel > 10000 else ""))
        plan = CombinePlan(0, 0.2, tuple(range(1, args.degree + 1)), (0.2,) * args.degree)
        g = torch.Generator().manual_seed(1)
        phi = torch.randn(numel, generator=g)
        received_phi = {p: torch.randn(numel, generator=g) for p in plan.neighbors}
        full_round = None
        for label, kw in SETTINGS.items():
            cfg = Config()
            cfg.compression = CompressionConfig(**kw)
            initial = {l: torch.zeros(numel) for l in range(args.degree + 1)}
            gossip = make_gossip(cfg, 0, initial.__getitem__)
            peers = [make_gossip(cfg, p, initial.__getitem__) for p in plan.neighbors]
            peer_plans = [CombinePlan(p, 0.8, (0,), (0.2,)) for p in plan.neighbors]
            # What the neighbours send this agent: their real payloads, so decoding costs what it would.
            incoming = {p: g_p.outgoing(received_phi[p], pp, 0)[0] for p, g_p, pp in zip(plan.neighbors, peers,
                                                                                             peer_plans)}
            if isinstance(gossip, FullStateGossip):
                incoming = received_phi

            def one_round():
                gossip.outgoing(phi, plan, 0)
                return gossip.merge(phi, incoming, plan, 0)

            round_s = median_time(one_round)
            message = gossip.outgoing(phi, plan, 0)[1]
            gossip.merge(phi, incoming, plan, 0)
            size = nbytes(message)
            if full_round is None:
                full_round, full_bytes = round_s, size
            if kw:
                c = gossip.compressor
                gen = torch.Generator().manual_seed(0)
                enc_dec = median_time(lambda: c.decode(c.encode(phi, gen), numel, torch.float32, gen))
            else:
                enc_dec = 0.0
            share_txt = f" {round_s / iteration_s:>11.2%}" if numel > 10000 else ""
            print(f"  {label:<11} {size:>10} {full_bytes / size:>8.1f}x {enc_dec * 1e3:>10.3f} "
                  f"{round_s * 1e3:>9.3f} {round_s / full_round:>7.1f}x{share_txt}")
        print()
    print("bytes/msg: payload handed to the transport per neighbour and round; round ms: this agent's outgoing + "
          "merge at the given degree (transfer time not included); vs full: against the full-state combine; "
          "of iteration: round ms / the Conv4 compute above.")
    print(share.stop().report())


if __name__ == "__main__":
    main()
