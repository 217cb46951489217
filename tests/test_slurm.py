"""launch/slurm.sbatch against a real Slurm: slurmctld, munged and two slurmd started on this machine
(``tests/slurm/cluster.sh``: nodes n1 and n2, which share the filesystem), jobs submitted with ``sbatch`` and
followed with ``sacct``; requeues made the two ways Slurm makes them.

Marked ``slurm`` and left out of the default run (the README's test command): ``.ci/run`` installs Slurm and runs
them with ``pytest -m slurm``; elsewhere ``pytest -m slurm`` installs slurm-wlm and munge itself (root and apt-get),
or skips saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
#: a short sinusoid run: 600 iterations, a checkpoint every 100, small evaluations
RUN = ["train.iterations=600", "train.checkpoint_every=100", "train.eval_every=100", "task.eval_tasks=50",
       "task.final_eval_tasks=50", "maml.final_adapt_steps=2"]
#: agent 0 takes 30x as long per meta-gradient (it sleeps; results do not change): the run is still going when
#: its first checkpoint appears, however fast the machine, so the requeue lands midway
SLOW = ["runtime.slowdown=[[0,30]]"]
#: how long a job may go without a new line in its output before it counts as stuck
STALL_S = 300


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or not (shutil.which("sbatch") or shutil.which("apt-get")):
        pytest.skip("needs root and Slurm (slurm-wlm, munge) or apt-get to install it; .ci/run installs it")
    start = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        pytest.skip(f"could not start a one-node Slurm here: {start.stderr.strip().splitlines()[-1:]}")
    yield
    subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


def submit(out: Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None) -> int:
    """``sbatch launch/slurm.sbatch ARGS`` from the repository root, its output in ``out``; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", *options, str(SBATCH), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def attempts(job: int) -> list[tuple[str, str]]:
    """(state, exit code) of each attempt of ``job`` that has ended, from the job-completion record."""
    proc = subprocess.run(["sacct", "-c", "-n", "-P", "-j", str(job), "-o", "state,exitcode"], capture_output=True,
                          text=True, timeout=60)
    return [tuple(line.split("|")) for line in proc.stdout.split()]


def wait_for(done, out: Path, what: str):
    """Poll ``done()`` while the job's output ``out`` keeps growing (a loaded machine is slower, not broken)."""
    size, moved = -1, time.monotonic()
    while not (result := done()):
        now = out.stat().st_size if out.exists() else 0
        if now != size:
            size, moved = now, time.monotonic()
        assert time.monotonic() - moved < STALL_S, f"{what}: no progress for {STALL_S} s\n" + tail(out)
        time.sleep(0.5)
    return result


def finished(job: int, out: Path) -> list[tuple[str, str]]:
    return wait_for(lambda: (a := attempts(job)) and a[-1][0] not in ("PENDING", "REQUEUED") and a, out,
                    f"job {job}")


def tail(out: Path) -> str:
    return "\n".join(out.read_text().splitlines()[-40:]) if out.exists() else f"({out} not written)"


def models(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run_dir / "models").glob("*.pt"))}


def assert_same_models(run_dir: Path, reference: Path) -> None:
    ours, theirs = models(run_dir), models(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 7, (ours.keys(), theirs.keys())  # 6 agents + centroid
    for name in ours:
        flat = {k: v for k, v in ours[name].items() if isinstance(v, torch.Tensor)}
        assert flat and all(torch.equal(v, theirs[name][k]) for k, v in flat.items()), name


@pytest.fixture(scope="module")
def requeued(cluster, tmp_path_factory) -> dict[str, tuple[int, Path, Path]]:
    """Two 6-agent jobs, each requeued once its first checkpoint is there: ``preempted`` on two nodes (3 agents
    each) by ``scontrol requeue`` (Slurm SIGTERMs every process, as preemption does), ``time_limit`` on one node
    by the USR1 that ``--signal=B:USR1@120`` sends to the batch shell before the time limit. Both run at once;
    how -> (job, log, run)."""
    jobs = {}
    for how, nodes in (("preempted", 2), ("time_limit", 1)):
        folder = tmp_path_factory.mktemp(how)
        out, run_dir = folder / "slurm.out", folder / "run"
        jobs[how] = (submit(out, *RUN, *SLOW, f"hydra.run.dir={run_dir}", options=(f"--nodes={nodes}",)), out,
                     run_dir)
    for how, (job, out, run_dir) in jobs.items():
        first = run_dir / "checkpoints" / "agent0" / "iter00000100.pt"
        wait_for(lambda: first.exists() or attempts(job), out, "the first checkpoint")
        assert not attempts(job), "the job ended before its first checkpoint could be requeued\n" + tail(out)
        if how == "preempted":
            subprocess.run(["scontrol", "requeue", str(job)], check=True, timeout=60)
        else:  # the batch shell alone gets USR1, as from --signal=B:USR1@120
            subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=60)
    return jobs


@pytest.fixture(scope="module")
def uninterrupted(requeued, tmp_path_factory) -> Path:
    """The same run never stopped: the per-agent simulator, bit for bit the torchrun agents' arithmetic
    (tests/test_distributed.py checks that); computed while the requeued jobs run."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.vectorize=false",
                           *RUN, f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("how", ["preempted", "time_limit"])
def test_a_requeued_job_resumes_and_finishes_bit_identical(requeued, uninterrupted, how):
    """One sbatch line runs the 6 agents (one torchrun per node: 2 x 3, or 1 x 6); requeued midway (``requeued``),
    every agent stops cleanly naming the newest checkpoint, the job runs again with SLURM_RESTART_COUNT=1,
    continues from that checkpoint and ends with every model bit-identical to an uninterrupted run and every
    evaluation recorded once. Catches a requeued job starting from scratch (refused: the directory holds a run)
    or from the wrong directory, a SIGTERM that kills the agents without a word, a USR1 that ends the job instead
    of requeueing it, and nodes that do not meet (a rendezvous address only the first node can resolve)."""
    job, out, run_dir = requeued[how]
    states = finished(job, out)
    log = out.read_text()
    assert len(states) == 2 and states[-1] == ("COMPLETED", "0:0"), (states, tail(out))  # two attempts
    assert ("2 node(s) x 3 agents" if how == "preempted" else "1 node(s) x 6 agents") in log, tail(out)
    if how == "time_limit":
        assert "the time limit is near: requeueing" in log, tail(out)
    assert "dif_maml_dist: terminated (SIGTERM); the newest checkpoint of every agent is iteration" in log, tail(out)
    assert "requeued (restart 1): continuing" in log, tail(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_iteration"] >= 100 and summary["iterations"] == 600, summary
    assert_same_models(run_dir, uninterrupted)
    records = [json.loads(line) for line in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (uninterrupted / "metrics" / "network.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [r["iteration"] for r in reference] == [0, 100, 200, 300, 400, 500,
                                                                                         600]
    assert [r["centroid_test_loss_post"] for r in records] == [r["centroid_test_loss_post"] for r in reference]


def one_line(job: int, out: Path) -> str:
    states = finished(job, out)
    assert states == [("FAILED", "2:0")], (states, tail(out))
    errors = [line for line in out.read_text().splitlines() if "error" in line]
    assert len(errors) == 1, tail(out)
    return errors[0]


def test_an_allocation_that_does_not_fit_the_graph_is_refused_in_one_line(cluster, tmp_path):
    """Agents per node x nodes must equal the topology's agents, and the job must have one task (one torchrun)
    per node: each mistake ends the job with one line naming it and exit status 2, before any agent starts
    (catches torchrun started with the wrong world size, failing in a traceback per process)."""
    jobs = {"agents": submit(tmp_path / "agents.out", f"hydra.run.dir={tmp_path / 'a'}", env={"AGENTS_PER_NODE": "4"}),
            "tasks": submit(tmp_path / "tasks.out", f"hydra.run.dir={tmp_path / 'b'}",
                            options=("--ntasks-per-node=2",))}
    line = one_line(jobs["agents"], tmp_path / "agents.out")
    assert line == ("dif_maml_dist: error: topology 'paper6' has 6 agents but SLURM_JOB_NUM_NODES=1 x "
                    "AGENTS_PER_NODE=4 starts 4 process(es): start 6 (or choose a topology with 4 agents, or "
                    "runtime=simulate)"), line
    line = one_line(jobs["tasks"], tmp_path / "tasks.out")
    assert line.startswith("slurm.sbatch: error: the allocation has 2 tasks on 1 node(s), but this script starts "
                           "one torchrun per node: submit with --ntasks-per-node=1"), line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_outside_slurm_or_without_srun_the_script_says_so(tmp_path):
    """Run by hand instead of through sbatch, or on a node whose PATH lacks srun: one line each, exit status 2
    (catches a script that goes on to start torchrun without an allocation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH)], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "slurm.sbatch: error: not inside a Slurm job: submit this script with sbatch "
        "(sbatch launch/slurm.sbatch [overrides...])"), proc.stderr
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("hostname", "dirname"):
        (bare / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(["/bin/bash", str(SBATCH)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**env, "SLURM_JOB_ID": "7", "PATH": str(bare)})
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "slurm.sbatch: error: no srun on PATH on "), proc.stderr


def test_a_hydra_sweep_of_simulator_runs_goes_to_slurm_through_submitit(cluster, tmp_path):
    """``-m hydra/launcher=submitit_slurm``: each job of the sweep is a Slurm job (one process, the simulator)
    writing its own sweep folder; a sweep into folders that hold runs is refused in one line before anything is
    submitted, as a local sweep is. Catches sweep jobs that need the submitting process's state (they run in a
    fresh process on a node) and a sweep that would write over earlier runs."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "dif_maml_dist.train", "-m", "hydra/launcher=submitit_slurm", "runtime=simulate",
            "train.iterations=100", "train.eval_every=50", "task.eval_tasks=20", "task.final_eval_tasks=20",
            "maml.final_adapt_steps=2", "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in (0, 1)]
    assert [s["config"]["seed"] for s in summaries] == [0, 1]
    assert summaries[0]["centroid_test_loss"] != summaries[1]["centroid_test_loss"]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, logs  # one Slurm job (an array task) each
    before = (sweep / "0" / "summary.json").read_bytes()
    submitted = sorted((sweep / ".submitit").iterdir())
    again = subprocess.run([*args[:-3], "seed=0", *args[-2:]], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 2 and "sweep job 0 " in again.stderr and "already holds a run" in again.stderr
    assert (sweep / "0" / "summary.json").read_bytes() == before
    assert sorted((sweep / ".submitit").iterdir()) == submitted  # nothing submitted
