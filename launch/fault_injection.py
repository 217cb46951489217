"""Fault injection: kill random agents mid-run and check what the network does about it.

``--mode restart`` (default; ``runtime.on_peer_failure=stop``): first one uninterrupted reference job; then, per
trial, the same job under ``torchrun --max-restarts=1`` in which one agent process (chosen at random) is sent
SIGKILL once it reaches a random iteration. torchrun restarts every agent, they resume from the newest iteration
that all of them have a checkpoint of, and finish. A trial *survived* if the job exits 0 after exactly one
restart, and *matched* if every agent's final parameters equal the reference bit for bit (float64 on the CPU: the
resumed run repeats the same arithmetic from the same state).

``--mode continue`` (``runtime.on_peer_failure=continue``, one torchrun node per agent: launch/agent_node.sh):
per trial ``--kill`` random agents (1, or 2 at once) are SIGKILLed at a random iteration; the others go on. With
``--restart`` each killed agent's node restarts it and it comes back into the running network. Reported per trial:
who left and when, when the neighbours noticed and how long their round waited, whether every survivor finished,
the final centroid test loss against an uninterrupted run and against the same network with those agents removed
from the start (``runtime.departures=[[k,1]]``), and with restarts how long the agent took to be back (from its
process start) and that nobody else rolled back. Goals (issue 15): every survivor finishes, the loss is at most 5%
above the uninterrupted run's (a fault may leave it lower: the run is not at its optimum), no round waits longer
than ``runtime.timeout_s`` plus one round, and a restarted agent is back within 2 x ``runtime.timeout_s`` of its
process start.

Run: .venv/bin/python launch/fault_injection.py [--mode restart|continue] [--trials 5] [--iterations 120]
     [--checkpoint-every 10] [--kill 1] [--restart] [--timeout-s 10] [--seed 0] [--out runs/faults] [--nproc 6]
     [extra hydra overrides ...]
Exit status: 0 if every trial met its goals.
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
from typing import Optional

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
    ap.add_argument("--mode", choices=("restart", "continue"), default="restart",
                    help="restart: the job restarts from checkpoints; continue: the others go on")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=None, help="default 120 (restart), 3000 (continue)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="default 10 (restart), 500 (continue)")
    ap.add_argument("--kill", type=int, default=1, help="continue: agents killed at once per trial")
    ap.add_argument("--restart", action="store_true", help="continue: the killed agents' nodes restart them")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="continue: runtime.timeout_s")
    ap.add_argument("--seed", type=int, default=0, help="seeds the choice of agent and iteration")
    ap.add_argument("--nproc", type=int, default=6, help="agents (the topology must have as many)")
    ap.add_argument("--out", type=Path, default=Path("runs/faults"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. strategy=centralized")
    args = ap.parse_args()
    continuing = args.mode == "continue"
    args.iterations = args.iterations or (3000 if continuing else 120)
    args.checkpoint_every = args.checkpoint_every or (500 if continuing else 10)
    if continuing:
        sys.exit(main_continue(args, ap))
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


# ------------------------------------------------------------------------------------------- continue mode
def start_nodes(run_dir: Path, nproc: int, overrides: list[str], restarts: int) -> list[subprocess.Popen]:
    """One torchrun node per agent (launch/agent_node.sh), static rendezvous on a free port."""
    port = free_port()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    nodes = []
    for k in range(nproc):
        env = dict(os.environ, NUM_AGENTS=str(nproc), AGENT=str(k), MASTER=f"127.0.0.1:{port}", RUN_DIR=str(run_dir),
                   MAX_RESTARTS=str(restarts), PYTHONUNBUFFERED="1",
                   TORCHRUN=f"{sys.executable} -m torch.distributed.run")
        nodes.append(subprocess.Popen(["bash", str(REPO / "launch" / "agent_node.sh"), *overrides], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT))
    return nodes


def agent_pid(run_dir: Path, rank: int, restart: int = 0) -> int | None:
    """The pid of agent ``rank``'s worker process of the job writing ``run_dir`` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (f"RANK={rank}" in env and f"TORCHELASTIC_RESTART_COUNT={restart}" in env
                and "dif_maml_dist.train" in cmd and f"hydra.run.dir={run_dir}" in cmd):
            return int(proc.name)
    return None


def finish_nodes(nodes: list[subprocess.Popen], run_dir: Path, deadline: float,
                 survivors: Optional[list[int]] = None) -> bool:
    """Wait for the run's summary (written by its last survivor), or for every agent in ``survivors`` to have
    written its final record; then for the nodes, which linger in torchrun's exit barrier (up to 300 s) when a
    node is gone for good: those are stopped, the run's files are complete."""
    all_in: list[float] = []

    def finished() -> bool:
        if (run_dir / "summary.json").is_file():
            return True
        if survivors is not None and all((run_dir / "agents" / f"agent{k}.json").is_file() for k in survivors):
            all_in.append(time.time())  # the last of them may be writing the summary: a minute for it
            return all_in[-1] - all_in[0] > 60
        return False
    while not finished() and time.time() < deadline:
        if all(n.poll() is not None for n in nodes):
            break
        time.sleep(0.2)
    linger = time.time() + 10
    for n in nodes:
        try:
            n.wait(timeout=max(0.1, linger - time.time()))
        except subprocess.TimeoutExpired:
            n.kill()  # torchrun in its exit barrier: nothing of the run is left to write
            n.wait()
    if not (run_dir / "summary.json").is_file() and (run_dir / "agents").is_dir():
        # Every node is done and no agent wrote the summary: a departure nobody saw (all the departed agent's
        # neighbours left too). The summarize step writes it from what is there, as the README says.
        subprocess.run([sys.executable, "-m", "dif_maml_dist.summarize", str(run_dir)], cwd=REPO,
                       capture_output=True)
    return (run_dir / "summary.json").is_file()


def centroid_loss(run_dir: Path) -> float | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["centroid_test_loss"] if path.is_file() else None


def monotonic_iterations(run_dir: Path, rank: int) -> bool:
    """Agent ``rank``'s records never go back in iteration (nobody rolled it back)."""
    lines = (run_dir / "metrics" / f"agent{rank}.jsonl").read_text().splitlines()
    its = [json.loads(line)["iteration"] for line in lines if line.strip()]
    return all(a < b for a, b in zip(its, its[1:]))


def run_plain(run_dir: Path, args, overrides: list[str]) -> float:
    nodes = start_nodes(run_dir, args.nproc, overrides, 0)
    if not finish_nodes(nodes, run_dir, time.time() + args.timeout):
        sys.exit(f"a job without faults failed; see {run_dir.parent / (run_dir.name + '.log')}")
    return centroid_loss(run_dir)


def main_continue(args, ap) -> int:
    if not 1 <= args.kill < args.nproc:
        ap.error(f"--kill must be between 1 and {args.nproc - 1}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / f"continue-{stamp}"
    overrides = [f"train.iterations={args.iterations}", f"train.checkpoint_every={args.checkpoint_every}",
                 "train.log_every=10", f"train.eval_every={args.iterations}", "task.eval_tasks=200",
                 "maml.final_adapt_steps=2", "train.dtype=float64", f"runtime.timeout_s={args.timeout_s:g}",
                 *args.overrides]
    t0 = time.time()
    reference = run_plain(out / "uninterrupted", args, overrides)
    print(f"uninterrupted: {args.nproc} agents, {args.iterations} iterations, centroid test loss {reference:.4f} "
          f"({time.time() - t0:.0f} s); kill {args.kill} per trial{', restarted' if args.restart else ''}; "
          f"runtime.timeout_s={args.timeout_s:g}; overrides: {' '.join(args.overrides) or '-'}", flush=True)
    removed: dict[tuple[int, ...], float] = {}
    rng = random.Random(args.seed)
    print(f"{'trial':>5} | {'killed':>6} | {'at iter':>7} | {'noticed (iter, by, waited s)':<30} | finished | "
          f"{'loss':>7} | {'vs full':>7} | {'vs removed':>10} | {'back s':>6} | rollback | seconds", flush=True)
    met = 0
    for trial in range(args.trials):
        victims = tuple(sorted(rng.sample(range(args.nproc), args.kill)))
        # With restarts, early enough that the restarted agent (seconds to start) comes back before the end.
        last = args.iterations // 2 if args.restart else args.iterations - args.iterations // 10
        target = rng.randrange(args.checkpoint_every, last)
        if victims not in removed:
            departures = ",".join(f"[{v},1]" for v in victims)
            removed[victims] = run_plain(out / f"removed-{'-'.join(map(str, victims))}", args,
                                         [*overrides, f"runtime.departures=[{departures}]"])
        run_dir = out / f"trial{trial}"
        t1 = time.time()
        nodes = start_nodes(run_dir, args.nproc, overrides, 1 if args.restart else 0)
        killed_at: dict[int, int] = {}
        while len(killed_at) < len(victims) and time.time() - t1 < args.timeout:
            if iteration_of(run_dir, victims[0]) >= target:
                pids = {v: agent_pid(run_dir, v) for v in victims}
                if all(p is not None for p in pids.values()):
                    for v, pid in pids.items():  # two at once: back to back, before either is noticed
                        os.kill(pid, signal.SIGKILL)
                        killed_at[v] = iteration_of(run_dir, v)
            time.sleep(0.01)
        finished = finish_nodes(nodes, run_dir, t1 + args.timeout,
                                None if args.restart else [k for k in range(args.nproc) if k not in victims])
        summary = json.loads((run_dir / "summary.json").read_text()) if finished else {}
        survivors = [k for k in range(args.nproc) if k not in victims]
        done = set(summary.get("survivors", []))
        all_finished = finished and set(survivors) <= done and (not args.restart or set(victims) <= done)
        loss = summary.get("centroid_test_loss")
        views = [json.loads((run_dir / "agents" / f"agent{k}.json").read_text()) for k in sorted(done)]
        first_noticed = {}
        for k, v in zip(sorted(done), views):
            for d in v.get("departures", []):
                if d["agent"] in victims and d["how"] == "no message":
                    prev = first_noticed.get(d["agent"])
                    if prev is None or d["iteration"] < prev[0]:
                        first_noticed[d["agent"]] = (d["iteration"], k, d.get("waited_s", 0.0))
        waits = [w for (_, _, w) in first_noticed.values() if w is not None]
        back = [r["back_at"] - r["started_at"] for r in summary.get("returned", []) if "started_at" in r]
        rolled_back = any(not monotonic_iterations(run_dir, k) for k in survivors) if finished else True
        vs_full = loss / reference - 1 if loss is not None else float("nan")
        vs_removed = loss / removed[victims] - 1 if loss is not None else float("nan")
        ok = (all_finished and vs_full <= 0.05 and not rolled_back
              and all(w <= args.timeout_s + 1.0 for w in waits)
              and (not args.restart or (len(back) == len(victims) and all(b <= 2 * args.timeout_s for b in back))))
        met += ok
        note = "; ".join(f"{a}: {it}, {by}, {w:.2f}" for a, (it, by, w) in sorted(first_noticed.items())) or "-"
        at = ",".join(str(killed_at.get(v)) for v in victims)
        shown = loss if loss is not None else float("nan")
        print(f"{trial:5d} | {','.join(map(str, victims)):>6} | {at:>7} | "
              f"{note:<30} | {'yes' if all_finished else 'NO':>8} | {shown:7.4f} | "
              f"{100 * vs_full:+6.2f}% | {100 * vs_removed:+9.2f}% | "
              f"{','.join(f'{b:.1f}' for b in back) or '-':>6} | {'YES' if rolled_back else 'no':>8} | "
              f"{time.time() - t1:7.0f}", flush=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
    print(f"goals met in {met}/{args.trials} trials (runs and logs in {out})")
    return 0 if met == args.trials else 1


REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    main()
