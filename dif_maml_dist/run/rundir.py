"""The run directory: where it may be, whether a run may start or continue there, and who owns it.

Every check here runs before hydra writes its record (``.hydra/``) into the directory, so a refused start leaves
the directory exactly as it was. A run owns its directory through a lock file (``RUN_DIR/.lock``) taken by rank 0
before anything is written and released when the process leaves; a lock whose holder is gone (same host, process
no longer alive) is stale and taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from dif_maml_dist.run import checkpoint
from dif_maml_dist.run.files import unwritable

LOCK_NAME = ".lock"
#: Files a run that never started may leave (its record and its lock): a failed start removes a directory that
#: holds nothing else, and that did not exist before.
START_ONLY = {".hydra", LOCK_NAME}


class RunDirError(ValueError):
    """The run directory cannot be used as asked (a user mistake: one line, exit status 2)."""


def check_location(run_dir: str | Path) -> Path:
    """``run_dir`` as a path, if it can be a run directory: not empty, not a file, not below a file, and writable
    (its nearest existing folder: the run directory itself, or where it will be created)."""
    if str(run_dir).strip() == "":
        raise RunDirError("hydra.run.dir is empty, which would write the run into the current folder: give a "
                          "directory, e.g. hydra.run.dir=runs/NAME")
    path = Path(run_dir)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is below {p}, which is a file"
            raise RunDirError(f"hydra.run.dir={run_dir} {what}: choose a directory path")
    # Tried (``files.unwritable``), not read off the permission bits: those say nothing for root, a read-only
    # mount or /proc. Without it the refusal came as hydra's or the lock's traceback.
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if unwritable(existing):
        what = "is not writable" if existing == path else "cannot be created"
        where = "" if existing == path else f": {existing} is not writable"
        raise RunDirError(f"hydra.run.dir={run_dir} {what}{where} by this user; choose a directory you can write to")
    return path


def holds_results(run_dir: Path) -> bool:
    metrics = run_dir / "metrics"
    return (run_dir / "summary.json").exists() or (metrics.is_dir() and any(metrics.iterdir()))


def check_fresh(run_dir: Path) -> None:
    """Refuse a directory that already holds a run's results (one-line error; nothing there is touched)."""
    if holds_results(run_dir):
        raise RunDirError(f"run directory {run_dir} already holds a run; nothing was changed there: choose a new "
                          f"hydra.run.dir=DIR (or continue it with train.resume=true)")


def check_resumable(run_dir: Path, num_agents: int, iterations: int, prints: dict[str, str],
                    simulated: bool = False) -> None:
    """``train.resume=true`` needs checkpoints of every agent (``simulated``: of the simulator), at an iteration no
    later than the target, intact (checksum) and written by this configuration (``prints``: the run's fingerprint).

    Read from this node's filesystem: on nodes without a shared run directory the agents agree again through
    the network when they resume (``checkpoint.resume``), and check their own files there. The simulator's are
    all here, so it is refused here when it has none."""
    if not (run_dir / "checkpoints").is_dir():
        raise RunDirError(f"train.resume=true, but {run_dir} holds no checkpoints to resume from (written every "
                          f"train.checkpoint_every iterations under {run_dir / 'checkpoints'})")
    whose = checkpoint.holders(num_agents, simulated)
    per_holder = [checkpoint.available(run_dir, k) for k in whose]
    if not any(per_holder):
        # The other kind of launch's checkpoints: a torchrun job's cannot continue in the simulator, nor back.
        other = checkpoint.holders(num_agents, not simulated)
        if any(checkpoint.available(run_dir, k) for k in other):
            written, resume = ("the simulator", "runtime=simulate") if not simulated else ("a torchrun job",
                                                                                          "runtime=torchrun")
            raise RunDirError(f"train.resume=true, but the checkpoints in {run_dir / 'checkpoints'} were written by "
                              f"{written}: resume it with {resume}")
        if simulated:
            raise RunDirError(f"train.resume=true, but {run_dir} holds no checkpoint of the simulator to resume from "
                              f"(written every train.checkpoint_every iterations and at the end under "
                              f"{checkpoint.agent_dir(run_dir, checkpoint.SIMULATOR)})")
    if all(per_holder):  # some agents' checkpoints elsewhere (another node): leave it to the collective check
        start = checkpoint.newest_common(per_holder)
        if start is not None:
            checkpoint.check_target(start, iterations, run_dir)
            for k in whose:
                checkpoint.load(run_dir, k, start, prints)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """Ownership of a run directory by one job (``job``: its torchrun run id, or this process for a lone one).

    ``acquire`` creates the directory and the lock file atomically (``O_EXCL``); a second job gets a one-line
    ``RunDirError`` before it has written anything. A restarted attempt of the same torchrun job takes its own
    lock over, as does anyone finding a lock whose process is dead on this host."""

    def __init__(self, run_dir: Path, job: str):
        self.run_dir, self.job = Path(run_dir), job
        self.path = self.run_dir / LOCK_NAME
        self.created_dir = False  #: whether acquire made the directory (a failed start may remove it)
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this instant, or damaged

    def acquire(self) -> "RunDirLock":
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if holder == {}:
                    time.sleep(0.2)
                    holder = self._holder()
                stale = holder is not None and (
                    holder.get("job") == self.job
                    or (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                        and not _alive(holder["pid"])))
                if holder and not stale:
                    raise RunDirError(f"run directory {self.run_dir} is in use by another job (pid {holder.get('pid')} "
                                      f"on {holder.get('host')}, since {holder.get('since')}): wait for it to "
                                      f"finish or choose another hydra.run.dir=DIR (if that job is gone, delete "
                                      f"{self.path})")
                if holder == {}:
                    raise RunDirError(f"{self.path} is unreadable: if no job runs in {self.run_dir}, delete it")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirError(f"could not lock {self.run_dir}: another job keeps taking it; choose another "
                          f"hydra.run.dir=DIR")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    @staticmethod
    def remove_at_end(run_dir: Path) -> None:
        """The run is over (continue mode: its summary is written, every agent finished or left): its lock goes,
        whoever holds it. Rank 0 may have left the network as if killed (``runtime.departures``, a crash) and
        never released it; nobody of this run writes here any more."""
        (Path(run_dir) / LOCK_NAME).unlink(missing_ok=True)

    def remove_if_unused(self) -> None:
        """After a refused start: remove the directory if this start made it and left nothing but its record."""
        self.release()
        if self.created_dir and self.run_dir.is_dir() and {p.name for p in self.run_dir.iterdir()} <= START_ONLY:
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


#: Below this much free space the run directory's disk counts as full (a checkpoint or a record would not fit).
FULL_DISK_BYTES = 1 << 20


def disk_hint(run_dir: Path) -> str:
    """For a peer's failure: a note when the run directory's disk is full (the likely reason a peer stopped:
    every agent writes there), else nothing."""
    import shutil

    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return ""
    return (f"; the disk holding {run_dir} is full ({free} bytes free), which may be why it stopped: free space, "
            f"then continue with train.resume=true") if free < FULL_DISK_BYTES else ""


def resume_record_dir(run_dir: Path) -> str:
    """Where hydra's record of a resumed start goes (relative to the run directory): the first start's
    ``.hydra/`` is never rewritten; each resume gets its own ``.hydra/resume-N``."""
    n = 1
    while (run_dir / ".hydra" / f"resume-{n}").exists():
        n += 1
    return f".hydra/resume-{n}"
