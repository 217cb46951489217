"""Fault injection: kill a random agent at a random iteration of a torchrun job and check that it recovers exactly.

First one uninterrupted reference job; then, per trial, the same job under ``torchrun --max-restarts=1`` in which
one agent process (chosen at random) is sent SIGKILL once it reaches a random iteration. torchrun restarts every
agent, they resume from the newest iteration that all of them have a checkpoint of, and finish. A trial
*survived* if the job exits 0 after exactly one restart, and *matched* if every agent's final parameters equal the
reference bit for bit (float64 on the CPU: the resumed run repeats the same arithmetic from the same state).

Run: .venv/bin/python launch/fault_injection.py [--trials 5] [--iterations 120] [--checkpoint-every 10]
     [--seed 0] [--out runs/faults] [--nproc 6] [extra hydra overrides ...]
Exit status: 0 if every trial survived and matched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(run_dir: Path, run_id: str, nproc: int, overrides: list[str], max_restarts: int) -> subprocess.Popen:
    # An explicit rendezvous id (instead of --standalone) lets this script find the job's worker processes.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={run_id}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
           "-m", "dif_maml_dist.train", *overrides, f"hydra.run.dir={run_dir}"]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def worker_pid(run_id: str, rank: int) -> int | None:
    """The pid of rank ``rank`` of job ``run_id`` in its first attempt (from /proc: Linux only)."""
    want = {f"TORCHELASTIC_RUN_ID={run_id}", f"RANK={rank}", "TORCHELASTIC_RESTART_COUNT=0"}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
        if want <= env:
            return int(proc.name)
    return None


def iteration_of(run_dir: Path, rank: int) -> int:
    """The newest iteration agent ``rank`` has logged (log_every=1)."""
    path = run_dir / "metrics" / f"agent{rank}.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError):
            continue
    return -1


def final_params(run_dir: Path, nproc: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run_dir / "models" / f"agent{k}.pt", weights_only=True) for k in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=120)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seeds the choice of agent and iteration")
    ap.add_argument("--nproc", type=int, default=6, help="agents (the topology must have as many)")
    ap.add_argument("--out", type=Path, default=Path("runs/faults"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. strategy=centralized")
    args = ap.parse_args()
    if args.iterations <= args.checkpoint_every:
        ap.error("--iterations must exceed --checkpoint-every, so that a kill can follow a checkpoint")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    out.mkdir(parents=True)
    overrides = [f"train.iterations={args.iterations}", f"train.checkpoint_every={args.checkpoint_every}",
                 "train.log_every=1", f"train.eval_every={args.iterations}", "task.eval_tasks=50",
                 "maml.final_adapt_steps=2", "train.dtype=float64", *args.overrides]

    t0 = time.time()
    ref = start_job(out / "reference", f"ref-{stamp}", args.nproc, overrides, max_restarts=0)
    if ref.wait(timeout=args.timeout) != 0:
        sys.exit(f"the reference job failed; see {out / 'reference.log'}")
    reference = final_params(out / "reference", args.nproc)
    print(f"reference: {args.nproc} agents, {args.iterations} iterations, checkpoint every {args.checkpoint_every} "
          f"({time.time() - t0:.0f} s); overrides: {' '.join(args.overrides) or '-'}")

    rng = random.Random(args.seed)
    print(f"{'trial':>5} | {'killed':>6} | {'target':>6} | {'at iter':>7} | {'resumed from':>12} | {'exit':>4} | "
          f"{'restarts':>8} | survived | matched | seconds")
    survived = matched = 0
    for trial in range(args.trials):
        rank, target = rng.randrange(args.nproc), rng.randrange(args.checkpoint_every, args.iterations - 1)
        run_dir, run_id = out / f"trial{trial}", f"trial{trial}-{stamp}"
        t0 = time.time()
        job = start_job(run_dir, run_id, args.nproc, overrides, max_restarts=1)
        killed_at = None
        while job.poll() is None and killed_at is None:
            if iteration_of(run_dir, rank) >= target:
                pid = worker_pid(run_id, rank)
                if pid is not None:
                    killed_at = iteration_of(run_dir, rank)
                    os.kill(pid, signal.SIGKILL)
            if time.time() - t0 > args.timeout:
                break
            time.sleep(0.02)
        try:
            code = job.wait(timeout=max(1.0, args.timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            job.kill()
            code = job.wait()
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        ok = code == 0 and killed_at is not None and summary.get("restarts") == 1
        same = ok and all(mine.keys() == ref.keys() and all(torch.equal(mine[n], ref[n]) for n in ref)
                          for mine, ref in zip(final_params(run_dir, args.nproc), reference))
        survived += ok
        matched += same
        resumed = summary.get("resumed_from_iteration")
        print(f"{trial:5d} | {rank:6d} | {target:6d} | {str(killed_at):>7} | {str(resumed):>12} | {code:4d} | "
              f"{str(summary.get('restarts')):>8} | {'yes' if ok else 'NO':>8} | {'yes' if same else 'NO':>7} | "
              f"{time.time() - t0:7.0f}")
        if ok and same:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep the logs and metrics, not the state
    print(f"survived {survived}/{args.trials}, matched the uninterrupted run {matched}/{args.trials} "
          f"(runs and logs in {out})")
    sys.exit(0 if survived == matched == args.trials else 1)


if __name__ == "__main__":
    main()
