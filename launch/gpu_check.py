"""Every check that needs a GPU, in one run, ending in a table (``launch/gpu_check.sh`` sets up and calls this).

Steps (each a subprocess with its own time limit; a failing step is reported and the next one runs):
  a. the test suite's ``gpu``-marked tests (tests/test_gpu.py);
  b. a torchrun job of 3 agents sharing one GPU over gloo (``runtime.device=cuda runtime.backend=gloo``), float64,
     against the CPU simulator's per-agent engine on the same config;
  c. nccl with one rank per GPU: a torchrun job through the CLI (one GPU: one rank — set-up, the single-agent
     path, teardown; the exchange and the hung peer need two GPUs and are in step a's tests);
  d. the simulator on the GPU at K = 6, 100, 1000 agents (iterations/s), next to the same machine's CPU;
  e. the Conv4 meta-gradient of Omniglot 5w1s on the GPU at meta-batch 16 and 32, per-task loop vs vmap;
  f. (with ``--omniglot DIR``) the final evaluation of a 6-agent Omniglot 5w1s run (600 test tasks, 0-10 steps)
     on the GPU, the agents sharing it over gloo: ``final_eval_seconds``.

``--cpu`` runs the same steps with the CPU in place of the GPU (gloo for nccl, small sizes): it checks this
script's plumbing on a machine without one, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` with its output in ``log``; exit status (124 on timeout), seconds, last lines."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = log.read_text(errors="replace").strip().splitlines()
    return code, time.perf_counter() - t0, "\n".join(text[-15:])


def torchrun(nproc: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dif_maml_dist.train", *overrides]


def train(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "dif_maml_dist.train", *overrides]


def summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def relative_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two runs' centroid curve and agents' final losses."""
    pairs = list(zip(a["centroid_adaptation_curve"], b["centroid_adaptation_curve"]))
    pairs += [(x["final_test_loss"], y["final_test_loss"]) for x, y in zip(a["agents"], b["agents"])]
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in pairs)


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float]] = []

    def add(self, step: str, ok: bool | None, figures: str, seconds: float) -> None:
        status = "skipped" if ok is None else ("ok" if ok else "FAILED")
        self.rows.append((step, status, figures, seconds))
        print(f"[{step}] {status} ({seconds:.0f} s): {figures}", flush=True)

    def table(self) -> str:
        lines = [f"{'step':<34} | {'result':<7} | {'s':>5} | figures", "-" * 110]
        lines += [f"{s:<34} | {r:<7} | {t:5.0f} | {f}" for s, r, f, t in self.rows]
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="logs and run directories")
    ap.add_argument("--omniglot", type=Path, help="a folder holding omniglot-py/ (step f)")
    ap.add_argument("--cpu", action="store_true", help="check this script's plumbing on the CPU (small sizes)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("gpu_check: error: no CUDA device is visible here; run this on a GPU machine (or --cpu to check the "
              "script itself)", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if cuda and not args.cpu else 0
    device = "cpu" if args.cpu else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    name = torch.cuda.get_device_name(0) if gpus else "CPU (plumbing check only)"
    print(f"GPU check, {stamp}: {name}, {gpus} GPU(s), torch {torch.__version__}, python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    report = Report()
    small = args.cpu
    common = ["topology=ring", "topology.num_agents=3", "train.dtype=float64", "task.eval_tasks=200",
              f"train.iterations={40 if small else 300}", "train.eval_every=100", "maml.final_adapt_steps=5"]

    # a. the gpu-marked tests
    code, secs, tail = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_gpu.py"],
                           args.out / "a_pytest.log", 300)
    last = tail.splitlines()[-1] if tail else ""
    report.add("a. pytest -m gpu", code == 0, last, secs)

    # b. agents sharing one GPU over gloo, against the CPU simulator
    shared, reference = args.out / "b_shared_gpu", args.out / "b_cpu_simulator"
    code, secs, _ = run(torchrun(3, *common, f"runtime.device={device}", "runtime.backend=gloo",
                                 f"hydra.run.dir={shared}"), args.out / "b_shared_gpu.log", 300)
    code2, secs2, _ = run(train(*common, "runtime=simulate", "runtime.vectorize=false", "runtime.device=cpu",
                                f"hydra.run.dir={reference}"), args.out / "b_cpu_simulator.log", 300)
    if code == code2 == 0:
        diff = relative_difference(summary(shared), summary(reference))
        report.add("b. 3 agents share a GPU over gloo", diff < 1e-8,
                   f"max relative difference to the CPU simulator {diff:.1e} (float64); centroid loss "
                   f"{summary(shared)['centroid_test_loss']:.5f}; {summary(shared)['wall_seconds']:.0f} s wall",
                   secs + secs2)
    else:
        report.add("b. 3 agents share a GPU over gloo", False, f"exit {code} / {code2}: see {args.out}", secs + secs2)

    # c. nccl, one rank per GPU, through the CLI
    ranks = max(gpus, 1)
    nccl = args.out / "c_nccl"
    backend = "gloo" if args.cpu else "nccl"
    code, secs, tail = run(torchrun(ranks, "topology=ring", f"topology.num_agents={ranks}",
                                    f"runtime.device={device}", f"runtime.backend={backend}",
                                    f"train.iterations={50 if small else 500}", f"hydra.run.dir={nccl}"),
                           args.out / "c_nccl.log", 300)
    s = summary(nccl)
    note = "one GPU: one rank (set-up, single-agent path, teardown)" if ranks == 1 else f"{ranks} ranks exchanging"
    report.add(f"c. {backend}, {ranks} rank(s)", code == 0 and bool(s),
               f"{note}; {s.get('wall_seconds', float('nan')):.1f} s wall, centroid loss "
               f"{s.get('centroid_test_loss', float('nan')):.4f}" if s else f"exit {code}: {tail[-300:]}", secs)

    # d. the simulator on the GPU, next to this machine's CPU
    agents = ["6", "100"] if small else ["6", "100", "1000"]
    for dev in ([device, "cpu"] if not small else ["cpu"]):
        code, secs, tail = run([sys.executable, "benchmarks/bench_simulator.py", "--quick", "--device", dev,
                                "--agents", *agents], args.out / f"d_simulator_{dev}.log", 400)
        rows = [line.split("|") for line in tail.splitlines() if line.strip()[:1].isdigit()]
        report.add(f"d. simulator on {dev}", code == 0,
                   "; ".join(f"K={r[0].strip()}: {r[1].split()[0]} it/s" for r in rows) or tail[-200:], secs)

    # e. Conv4 meta-gradient on the GPU: loop vs vmap at meta-batch 16 and 32
    code, secs, tail = run([sys.executable, "benchmarks/bench_conv4.py", "--device", device, "--settings",
                            "omniglot_5w1s", "--meta-batch", "32", "--no-eval", "--repeats", "2" if small else "5"],
                           args.out / "e_conv4.log", 400)
    rows = [line for line in tail.splitlines() if "|" in line and line.split("|")[0].strip().isdigit()]
    report.add("e. Conv4 5w1s meta-gradient", code == 0,
               "; ".join(f"{r.split('|')[0].split()[0]} tasks: loop {r.split('|')[1].split()[0]} s, vmap "
                         f"{r.split('|')[1].split()[1]} s" for r in rows) or tail[-200:], secs)

    # f. the final evaluation of a 6-agent Omniglot run on the GPU
    if args.omniglot is None:
        report.add("f. Omniglot final evaluation", None, "give --omniglot DIR (a folder with omniglot-py/)", 0)
    else:
        final = args.out / "f_omniglot"
        code, secs, tail = run(torchrun(6, "task=omniglot_5w1s", f"data.root={args.omniglot}",
                                        f"runtime.device={device}", "runtime.backend=gloo", "train.iterations=1",
                                        *(["task.final_eval_tasks=60"] if small else []),
                                        f"hydra.run.dir={final}"), args.out / "f_omniglot.log", 500)
        s = summary(final)
        report.add("f. Omniglot final evaluation", code == 0 and bool(s),
                   f"final_eval_seconds {s['final_eval_seconds']:.1f} (6 agents + centroid, "
                   f"{s['config']['task']['final_eval_tasks']} tasks, 0-10 steps)" if s else f"exit {code}",
                   secs)

    table = report.table()
    print("\n" + table)
    (args.out / "table.txt").write_text(f"{stamp}, {name}, torch {torch.__version__}\n{table}\n")
    return 0 if all(r[1] != "FAILED" for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
