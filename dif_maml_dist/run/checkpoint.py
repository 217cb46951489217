"""Checkpoints: written atomically, verified on load, loaded without running code, matched to the run that wrote
them.

Layout: ``RUN_DIR/checkpoints/agent{k}/iter{N:08d}.pt`` holds agent k's loop state after iteration N (parameters,
optimizer state, task-stream RNG state, counters) and the run's fingerprint, as a plain ``torch.save`` file. The
simulator (``runtime=simulate``) is one holder of every agent's state: ``checkpoints/simulator/iter{N:08d}.pt``,
one file per checkpoint whatever the number of agents (a thousand agents would otherwise make a thousand files per
checkpoint), written and read by the same functions (``SIMULATOR`` in place of an agent's id).
``iter{N:08d}.pt.sha256`` beside it holds the SHA-256 of its bytes, in ``sha256sum`` format (so
``sha256sum -c iter00000020.pt.sha256`` checks it by hand). Both are written to temporary names and flushed to
disk first; then the checksum is renamed into place, then the checkpoint. A ``.pt`` therefore appears only
complete and always after its checksum, so every ``.pt`` that ``available`` lists can be verified; a process
killed mid-write leaves the previous checkpoint as its newest (and at most a checksum without a checkpoint, which
counts for nothing and is removed by the next save). ``load`` reads the bytes once, checks them against the
checksum (a flipped bit or a truncated file is a one-line error naming the file, not a run that diverges later),
then unpickles those same bytes with ``weights_only=True``. The checksum guards against corruption, not forgery:
what keeps a planted file from running code is ``weights_only``. A checkpoint without its checksum (written before
checksums were kept, or the ``.sha256`` lost) is refused; the error says how to vouch for it with ``sha256sum``.

Each agent keeps its ``keep`` newest (pruning removes a checkpoint, then its checksum): agents run in lock-step
(each exchange waits for the neighbours), so when one dies the others are at most one checkpoint ahead, and the
newest iteration that *every* agent has is still on disk.

Checkpoints are written every ``train.checkpoint_every`` iterations and at a run's last iteration, so a finished
run can always be extended (``train.resume=true`` with a larger ``train.iterations``); ``checkpoint_every=0``
writes none, not even the last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch

from dif_maml_dist.config import Config

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The run cannot continue from its checkpoints as asked (every rank raises it together; exit status 2)."""


_NAME = re.compile(r"^iter(\d{8})\.pt$")
_SUM = re.compile(r"^iter(\d{8})\.pt\.sha256$")
_HEX = re.compile(r"^[0-9a-f]{64}$")

#: Config sections that shape the trajectory. Left out on purpose: the schedule's length and bookkeeping
#: (train.iterations, eval_every, log_every, checkpoint_every, keep_checkpoints, save_models, resume), where the
#: data lives (data.*), and how processes run (runtime.*) — a run may be resumed with more iterations, from
#: another mount point, or with another timeout.
_TRAIN_KEYS = ("init", "dtype")


def fingerprint(cfg: Config, weights: np.ndarray, parameters: int) -> dict[str, str]:
    """Short hashes of everything a checkpoint's state depends on, by section (so a mismatch can be named)."""
    sections: dict[str, Any] = {
        "seed": cfg.seed, "task": asdict(cfg.task), "model": asdict(cfg.model), "strategy": asdict(cfg.strategy),
        "compression": asdict(cfg.compression),
        "optim": asdict(cfg.optim), "maml": asdict(cfg.maml),
        "train": {k: getattr(cfg.train, k) for k in _TRAIN_KEYS},
        "topology": {"config": asdict(cfg.topology), "weights": np.round(weights, 12).tolist()},
        "parameters": parameters,
    }
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for name, value in sections.items()}


#: The simulator's checkpoints: one holder of every agent's state (pass it where an agent's id goes).
SIMULATOR = "simulator"
#: Whose checkpoints a folder holds: an agent's id, or ``SIMULATOR``.
Holder = Union[int, str]


def holders(num_agents: int, simulated: bool) -> list[Holder]:
    """Whose checkpoints a run of ``num_agents`` agents writes: each agent's, or (``runtime=simulate``) the
    simulator's."""
    return [SIMULATOR] if simulated else list(range(num_agents))


def agent_dir(run_dir: Path, agent: Holder) -> Path:
    return Path(run_dir) / "checkpoints" / (SIMULATOR if agent == SIMULATOR else f"agent{agent}")


def checkpoint_path(run_dir: Path, agent: Holder, iteration: int) -> Path:
    return agent_dir(run_dir, agent) / f"iter{iteration:08d}.pt"


def checksum_path(path: Path) -> Path:
    """The checksum file of checkpoint ``path`` (``iter{N:08d}.pt.sha256``)."""
    return path.with_name(path.name + ".sha256")


def available(run_dir: Path, agent: Holder) -> list[int]:
    """Iterations of agent ``agent``'s complete checkpoints, ascending: the ``.pt`` files, each renamed into place
    only after it and its checksum were on disk (temporary files, and a checksum alone, are not complete)."""
    folder = agent_dir(run_dir, agent)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def newest_common(per_agent: Iterable[Iterable[int]]) -> int | None:
    """The newest iteration every agent has a checkpoint of (``None`` if there is none)."""
    common = None
    for its in per_agent:
        common = set(its) if common is None else common & set(its)
    return max(common) if common else None


def _write_synced(path: Path, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Put the folder's renames on disk, so they survive a power cut in the order they were made."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open a folder (the renames are still atomic)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(run_dir: Path, agent: Holder, state: dict[str, Any], prints: dict[str, str], keep: int = 2) -> Path:
    """Write agent ``agent``'s ``state`` (``state["iteration"]`` names the file) and its checksum atomically;
    prune to ``keep``."""
    path = checkpoint_path(run_dir, agent, int(state["iteration"]))
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({**state, "fingerprint": prints}, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    sums = checksum_path(path)
    tmp, tmp_sum = (p.with_name(p.name + f".tmp{os.getpid()}") for p in (path, sums))
    try:
        _write_synced(tmp, data)  # both on disk before the renames make them "complete"
        _write_synced(tmp_sum, f"{digest}  {path.name}\n".encode())
        # Written again (a resumed run re-saving an iteration it had saved before the crash): the old file goes
        # first, so that no moment pairs the old checkpoint with the new checksum.
        path.unlink(missing_ok=True)
        os.replace(tmp_sum, sums)
        _sync_dir(folder)
        os.replace(tmp, path)
        _sync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sum.unlink(missing_ok=True)
    for old in available(run_dir, agent)[:-keep]:
        old_path = checkpoint_path(run_dir, agent, old)
        old_path.unlink(missing_ok=True)  # the checkpoint first: a checksum alone never counts
        checksum_path(old_path).unlink(missing_ok=True)
    for p in folder.iterdir():  # checksums whose checkpoint never landed (a save killed between the two renames)
        if _SUM.match(p.name) and not p.with_name(p.name[:-len(".sha256")]).exists():
            p.unlink(missing_ok=True)
    return path


def load(run_dir: Path, agent: Holder, iteration: int, prints: dict[str, str]) -> dict[str, Any]:
    """Agent ``agent``'s checkpoint of ``iteration``, verified against its checksum and checked against this run's
    fingerprint.

    ``weights_only=True``: tensors and plain containers only, so loading a checkpoint never runs code from it.
    Raises a one-line ``ValueError`` naming the file and the sections that differ, or what is wrong with the file.
    """
    path = checkpoint_path(run_dir, agent, iteration)
    sums = checksum_path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read checkpoint {path}: {err.strerror or err}; delete it to resume from the one "
                         f"before") from None
    try:
        fields = sums.read_text(encoding="ascii").split()
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} has no checksum file {sums.name} (written before checksums were kept, "
                         f"or the file was lost), so it cannot be verified; if you trust it, write one with "
                         f"'sha256sum {path.name} > {sums.name}' in {path.parent}, or delete it to resume from the "
                         f"one before") from None
    except (OSError, UnicodeDecodeError):
        fields = []
    expected = fields[0].lower() if fields else ""
    if not _HEX.match(expected):
        raise ValueError(f"checksum file {sums} does not hold a SHA-256; delete it and {path.name} to resume from "
                         f"the checkpoint before")
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"checkpoint {path} is corrupt (its SHA-256 differs from the one recorded in {sums.name} "
                         f"when it was written); delete it to resume from the one before")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (unpickling errors come in many types)
        raise ValueError(f"cannot load checkpoint {path}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}; "
                         f"delete it to resume from the one before") from None
    theirs = state.get("fingerprint", {}) if isinstance(state, dict) else {}
    differ = sorted(k for k in prints if theirs.get(k) != prints[k])
    if differ:
        raise ValueError(f"checkpoint {path} was written by a run with a different {', '.join(differ)}; resume "
                         f"with the configuration that wrote it, or start a new run directory")
    return state


class AgentCheckpoints:
    """The checkpointer of one agent process, or of the simulator (``agent=SIMULATOR``) (``loop.Checkpointer``):
    ``state()`` gives what to write."""

    def __init__(self, run_dir: Path, agent: Holder, state: Callable[[], dict[str, Any]], prints: dict[str, str],
                 every: int, keep: int, last: Optional[int] = None):
        self.run_dir, self.agent, self.state, self.prints = Path(run_dir), agent, state, prints
        self.every, self.keep, self.last = every, keep, last
        self.where = str(Path(run_dir) / "checkpoints")

    def save(self, iteration: int) -> None:
        state = self.state()
        assert state["iteration"] == iteration, (state["iteration"], iteration)
        save(self.run_dir, self.agent, state, self.prints, self.keep)
        self.last = iteration


def check_target(start: int, iterations: int, where: Path | str) -> None:
    """A resume must continue forward: ``train.iterations`` below the checkpoint's iteration is refused."""
    if start > iterations:
        raise ValueError(f"train.iterations={iterations}, but the run in {where} is checkpointed at iteration "
                         f"{start}: resume with train.iterations of at least {start}, or start a new run directory")


def restore_own(cohort, run_dir: Path, rank: int, prints: dict[str, str]) -> int | None:
    """A restarted agent of a network that went on without it (runtime.on_peer_failure=continue): its own newest
    good checkpoint into ``cohort`` (optimizer, task stream, counters), without asking anyone; its iteration, or
    None if it has none (a damaged file is skipped for the one before, with a warning)."""
    for iteration in reversed(available(run_dir, rank)):
        try:
            cohort.load_state_dict(load(run_dir, rank, iteration, prints))
            return iteration
        except ValueError as err:
            log.warning("%s", err)
    return None


def resume(cohort, transport, run_dir: Path, rank: Holder, prints: dict[str, str], iterations: int,
           restart_count: int = 0) -> int | None:
    """*Collective*: restore ``cohort`` (its ``load_state_dict``) from the newest iteration that every agent has a
    checkpoint of; that iteration (``None``: none yet, start from scratch — a torchrun restart before the first
    checkpoint). The simulator passes ``transport=None`` and ``rank=SIMULATOR``: it holds every agent.

    Agreed through the transport rather than read off one filesystem, so nodes without a shared run directory
    agree too. A failure on any rank (a checkpoint of another run, a damaged file, a target behind the
    checkpoint) is every rank's ``ValueError``, with the first rank's message."""
    gather = transport.all_gather_object if transport is not None else (lambda mine: [mine])
    start, err = None, None
    try:
        start = newest_common(gather(available(run_dir, rank)))
        if start is None and restart_count == 0:
            whose = "the simulator" if rank == SIMULATOR else "every agent"
            raise ValueError(f"train.resume=true, but no iteration has a checkpoint from {whose} in "
                             f"{Path(run_dir) / 'checkpoints'}")
        if start is not None:
            check_target(start, iterations, run_dir)
            cohort.load_state_dict(load(run_dir, rank, start, prints))
    except ValueError as e:
        err = str(e)
    errors = [e for e in gather(err) if e]
    if errors:
        raise ResumeError(errors[0])
    if rank in (0, SIMULATOR):
        log.info("resuming from the checkpoints of iteration %s (restart %d)", start, restart_count)
    return start
