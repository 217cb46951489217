"""The run directory nothing can corrupt, through the CLI: refused starts leave it byte for byte as it was, a
resume goes forward only and rewrites nothing until it has passed it, one job at a time owns it, and a run that
is interrupted or runs out of disk says so in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dif_maml_dist.run import rundir
from tests.helpers import REPO, STALL_S, wait_until
from tests.test_cli import train

#: A lone agent (no torchrun: a one-agent network) that checkpoints: the cheapest run with checkpoints.
LONE = ["topology=ring", "topology.num_agents=1", "task.eval_tasks=20", "maml.final_adapt_steps=2",
        "train.eval_every=10", "train.log_every=5", "train.checkpoint_every=10"]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file below ``run_dir`` with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("dif_maml_dist: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 20-iteration run with checkpoints at 10 and 20 (each test works on a copy)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = train([*LONE, "train.iterations=20", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return dest


def test_refused_resumes_and_quoted_or_repeated_run_dirs_change_nothing(finished, tmp_path):
    """Catches the early checks reading argv by hand: hydra's quoted value (``'hydra.run.dir="DIR"'``) and a
    repeated ``hydra.run.dir`` (hydra takes the last) were checked against another directory, and the old run's
    ``.hydra`` record was rewritten before the refusal; and a resume whose target is behind its checkpoint, which
    ran "iteration 20/10" and rewrote ``summary.json``. ``train.resume=yes`` must mean true, as it does to hydra.
    Then a checkpoint with one flipped byte: refused naming the file (it loaded silently)."""
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    fresh_elsewhere = tmp_path / "never"
    cases = {
        "quoted": ([f'hydra.run.dir="{run_dir}"'], "already holds a run"),
        "repeated": ([f"hydra.run.dir={fresh_elsewhere}", f"hydra.run.dir={run_dir}"], "already holds a run"),
        "behind": (["train.resume=yes", "train.iterations=10", f"hydra.run.dir='{run_dir}'"],
                   "train.iterations=10, but the run in"),
    }
    for name, (args, expect) in cases.items():
        line = one_error_line(train([*LONE, *args]))
        assert expect in line, (name, line)
        assert snapshot(run_dir) == before, name
    assert not fresh_elsewhere.exists()
    # A flipped byte in the newest checkpoint: named, not resumed from (it loaded silently before checksums).
    newest = run_dir / "checkpoints" / "agent0" / "iter00000020.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    before = snapshot(run_dir)
    line = one_error_line(train([*LONE, "train.resume=true", "train.iterations=30", f"hydra.run.dir={run_dir}"]))
    assert f"checkpoint {newest} is corrupt" in line, line
    assert snapshot(run_dir) == before


def test_resume_keeps_the_first_record_and_the_training_fields(finished, tmp_path):
    """A successful resume (quoted run directory, ``train.resume=1``): hydra's record of the first start is kept
    (the resume's goes to ``.hydra/resume-1``), the records before the resume point are untouched, and the record
    of the resume iteration keeps its training loss (catches it being replaced by a test-only record)."""
    run_dir = copy_of(finished, tmp_path)
    first = snapshot(run_dir)
    proc = train([*LONE, "train.resume=1", "train.iterations=30", f"hydra.run.dir=\"{run_dir}\""])
    assert proc.returncode == 0, proc.stderr
    after = snapshot(run_dir)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert after[name] == first[name]
    assert "train.iterations=30" in after[".hydra/resume-1/overrides.yaml"].decode()
    old = [json.loads(line) for line in first["metrics/agent0.jsonl"].decode().splitlines()]
    new = [json.loads(line) for line in after["metrics/agent0.jsonl"].decode().splitlines()]
    assert new[:len(old) - 1] == old[:-1]
    at_20 = new[len(old) - 1]
    assert at_20["iteration"] == 20 and at_20["resumed"] is True
    assert at_20["meta_train_loss"] == old[-1]["meta_train_loss"]
    assert [r["iteration"] for r in new[len(old):]] == [25, 30]
    assert not (run_dir / rundir.LOCK_NAME).exists()


def test_a_finished_run_shorter_than_checkpoint_every_is_extended_bit_for_bit(tmp_path):
    """A 5-iteration run with train.checkpoint_every=10 (the default is 1000) ends with a checkpoint of its last
    iteration, so train.resume=true train.iterations=15 extends it, and the result equals a straight 15-iteration
    run bit for bit: the model, the records after 5 and the summary's figures. Catches a finished run without a
    checkpoint ("no iteration has a checkpoint from every agent"), the bug that made resuming a short run fail."""
    short, straight = tmp_path / "short", tmp_path / "straight"
    for run_dir, iterations in ((short, 5), (straight, 15)):
        proc = train([*LONE, f"train.iterations={iterations}", f"hydra.run.dir={run_dir}"])
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (short / "checkpoints" / "agent0").iterdir()) == [
        "iter00000005.pt", "iter00000005.pt.sha256"]
    proc = train([*LONE, "train.resume=true", "train.iterations=15", f"hydra.run.dir={short}"])
    assert proc.returncode == 0, proc.stderr
    timing = {"wall_s", "compute_s", "exchange_s"}

    def after_5(run_dir: Path, name: str) -> list[dict]:
        lines = (run_dir / "metrics" / f"{name}.jsonl").read_text().splitlines()
        return [{k: v for k, v in r.items() if k not in timing} for r in map(json.loads, lines) if r["iteration"] > 5]

    for name in ("agent0", "network"):
        assert [r["iteration"] for r in after_5(short, name)] == [10, 15]
        assert after_5(short, name) == after_5(straight, name), name
    import torch

    for name in ("agent0", "centroid"):
        a, b = (torch.load(d / "models" / f"{name}.pt", weights_only=True) for d in (straight, short))
        assert all(torch.equal(a[n], b[n]) for n in a), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, short))
    for key in ("centroid_test_loss", "centroid_adaptation_curve", "mean_final_test_loss", "disagreement"):
        assert a[key] == b[key], key
    assert a["agents"][0]["final_test_loss"] == b["agents"][0]["final_test_loss"]
    assert b["resumed_from_iteration"] == 5 and a["resumed_from_iteration"] is None


def _run_until(args: list[str], ready, progress) -> subprocess.Popen:
    """The CLI started in the background and left running until ``ready()``; waits as long as ``progress()`` moves
    (a loaded machine makes it slower, not a failure)."""
    # SIGINT as a terminal delivers it: a shell starts background jobs (a test run started with `&`, a CI
    # runner) with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "dif_maml_dist.train", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(ready, progress, "the run never reached the point to interrupt it",
                   alive=lambda: proc.poll() is None)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1][-3000:]) from None
    return proc


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_stops_quietly_saying_where_to_continue(finished, tmp_path, sig, code, said):
    """Ctrl-C (SIGINT), or SIGTERM as Slurm sends it when it preempts or requeues a job, during a run: one line
    saying where the newest checkpoint is and how to continue, exit status 130 (143), no traceback (catches the
    KeyboardInterrupt tracebacks, and a SIGTERM that killed the run without a word or its lock released)."""
    run_dir = copy_of(finished, tmp_path)
    saved = run_dir / "checkpoints" / "agent0"
    records = run_dir / "metrics" / "agent0.jsonl"
    proc = _run_until([*LONE, "train.resume=true", "train.iterations=1000000", f"hydra.run.dir={run_dir}"],
                      lambda: any(int(p.stem[4:]) >= 40 for p in saved.glob("iter*.pt")),
                      lambda: records.stat().st_size)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=STALL_S)  # a hang guard: the run stops at its next Python instruction
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), code=code)
    newest = max(int(p.stem[4:]) for p in saved.glob("iter*.pt"))
    assert line.startswith(f"dif_maml_dist: {said}; ") and newest >= 40, line
    assert f"newest checkpoint of every agent is iteration {newest}" in line, line
    assert f"train.resume=true hydra.run.dir={run_dir}" in line
    assert not (run_dir / rundir.LOCK_NAME).exists()


def train_injected(inject: str, args: list[str]) -> subprocess.CompletedProcess:
    """The CLI with a fault injected into the library first (``inject``: Python run before ``main``)."""
    code = f"import sys\n{inject}\nsys.argv[0] = 'train'\nfrom dif_maml_dist.train import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_resume_that_fails_rewrites_no_record(finished, tmp_path):
    """The run stopped after its checkpoint of iteration 10 but with records up to 20; resumed from 10, it
    diverges at 15 (injected). Every record of the earlier run must be byte for byte as it was (catches the
    streams being cut at the resume point before the resumed run had passed them), no shadow stream left."""
    run_dir = copy_of(finished, tmp_path)
    for p in (run_dir / "checkpoints" / "agent0").glob("iter00000020.*"):
        p.unlink()
    (run_dir / "summary.json").unlink()
    before = snapshot(run_dir)
    diverge_at_15 = ("import dif_maml_dist.engine.agent as a\n"
                     "adapt = a.Agent.adapt\n"
                     "a.Agent.adapt = lambda self: adapt(self) * (float('nan') if self.state.iteration >= 14 else 1)")
    proc = train_injected(diverge_at_15, [*LONE, "train.resume=true", "train.iterations=20",
                                          f"hydra.run.dir={run_dir}"])
    line = one_error_line(proc, code=3)
    assert "non-finite meta-training loss or parameters by iteration 15" in line, line
    after = snapshot(run_dir)
    for name in ("metrics/agent0.jsonl", "metrics/network.jsonl"):
        assert after[name] == before[name], name
    assert not any(name.endswith(".resuming") for name in after)


def test_a_run_directory_has_one_owner(tmp_path):
    """A second job into a directory whose lock is held by a live process is refused in one line before it writes
    anything (catches the loser rewriting the winner's ``.hydra`` and logs); a lock left by a dead process is
    stale and taken over; the lock is gone when the run ends."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Alive until killed below, however long the refused start takes on a loaded machine.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        lock = {"job": "another", "pid": holder.pid, "host": os.uname().nodename, "since": "just now"}
        (run_dir / rundir.LOCK_NAME).write_text(json.dumps(lock))
        before = snapshot(run_dir)
        line = one_error_line(train([*LONE, "train.iterations=2", f"hydra.run.dir={run_dir}"]))
        assert f"is in use by another job (pid {holder.pid}" in line, line
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    proc = train([*LONE, "train.iterations=2", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "summary.json").is_file() and not (run_dir / rundir.LOCK_NAME).exists()


def test_lock_is_exclusive_in_process(tmp_path):
    """The lock itself: a second holder is refused while the first holds it, the same job (a torchrun restart)
    takes it over, and release frees it (catches an O_EXCL-less check-then-write race and a lock never freed)."""
    first = rundir.RunDirLock(tmp_path / "run", "job-a").acquire()
    with pytest.raises(rundir.RunDirError, match="in use by another job"):
        rundir.RunDirLock(tmp_path / "run", "job-b").acquire()
    again = rundir.RunDirLock(tmp_path / "run", "job-a").acquire()  # the same job's restart
    again.release()
    assert not (tmp_path / "run" / rundir.LOCK_NAME).exists()
    first.release()  # no longer its lock: nothing to remove, no error
    rundir.RunDirLock(tmp_path / "run", "job-b").acquire().release()


def test_full_disk_is_named_in_one_line(tmp_path):
    """Disk full while writing a checkpoint (injected: ENOSPC from the write): one line naming the disk's run
    directory and what to do, exit status 3, no traceback (catches the traceback rank 0 printed)."""
    run_dir = tmp_path / "run"
    disk_full = ("import errno, dif_maml_dist.run.checkpoint as c\n"
                 "def full(*a, **k):\n"
                 "    raise OSError(errno.ENOSPC, 'No space left on device', str(a[0]))\n"
                 "c._write_synced = full")
    proc = train_injected(disk_full, [*LONE, "train.iterations=20", f"hydra.run.dir={run_dir}"])
    line = one_error_line(proc, code=3)
    assert f"no space left on the disk holding {run_dir}" in line and "iter00000010.pt" in line, line
    assert not (run_dir / rundir.LOCK_NAME).exists()


def test_a_peers_failure_names_a_full_disk(tmp_path, monkeypatch):
    """Under torchrun the agent that hits the full disk says so itself; its neighbours only see it stop. Their
    message must point at the disk when it is full (catches "no message from agent 0" as the only clue) and add
    nothing when it is not."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - 4096, 4096))
    assert f"the disk holding {tmp_path} is full (4096 bytes free)" in rundir.disk_hint(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 0, 10 << 30))
    assert rundir.disk_hint(tmp_path) == ""


def test_a_single_run_is_composed_once_and_hydra_records_that_composition(tmp_path):
    """A single run's config is composed once, from the command line, and hydra's record of the run
    (``.hydra/``) is written from that same composition, with the run's directory and the overrides given.

    Catches the entry point composing the config a second time for hydra (two compositions that can disagree,
    e.g. in a run directory named by time), and a record written from a composition other than the run's."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    count = ("import atexit\n"
             "from hydra._internal.hydra import Hydra\n"
             "calls = []\n"
             "compose = Hydra.compose_config\n"
             "Hydra.compose_config = lambda self, *a, **k: calls.append(1) or compose(self, *a, **k)\n"
             "atexit.register(lambda: print('compositions', len(calls)))\n")
    proc = train_injected(count, [*LONE, "train.iterations=3", "seed=11", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "compositions 1", proc.stdout
    recorded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert recorded.train.iterations == 3 and recorded.seed == 11 and "hydra" not in recorded
    hydra_record = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
    assert hydra_record.runtime.output_dir == str(run_dir) and hydra_record.mode == "RUN"
    assert "seed=11" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == 11
