"""Per-agent checkpoints: written atomically, loaded without running code, matched to the run that wrote them.

Layout: ``RUN_DIR/checkpoints/agent{k}/iter{N:08d}.pt`` holds agent k's loop state after iteration N (parameters,
optimizer state, task-stream RNG state, counters) and the run's fingerprint. A file appears only complete (written
to a temporary name, flushed to disk, then renamed), so a process killed mid-write leaves the previous checkpoint
as its newest. Each agent keeps its ``keep`` newest: agents run in lock-step (each exchange waits for the
neighbours), so when one dies the others are at most one checkpoint ahead, and the newest iteration that *every*
agent has is still on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from .config import Config

_NAME = re.compile(r"^iter(\d{8})\.pt$")

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


def agent_dir(run_dir: Path, agent: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"agent{agent}"


def checkpoint_path(run_dir: Path, agent: int, iteration: int) -> Path:
    return agent_dir(run_dir, agent) / f"iter{iteration:08d}.pt"


def available(run_dir: Path, agent: int) -> list[int]:
    """Iterations of agent ``agent``'s complete checkpoints, ascending (temporary files are not complete)."""
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


def save(run_dir: Path, agent: int, state: dict[str, Any], prints: dict[str, str], keep: int = 2) -> Path:
    """Write agent ``agent``'s ``state`` (``state["iteration"]`` names the file) atomically; prune to ``keep``."""
    path = checkpoint_path(run_dir, agent, int(state["iteration"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "fingerprint": prints}, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it "complete"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in available(run_dir, agent)[:-keep]:
        checkpoint_path(run_dir, agent, old).unlink(missing_ok=True)
    return path


def load(run_dir: Path, agent: int, iteration: int, prints: dict[str, str]) -> dict[str, Any]:
    """Agent ``agent``'s checkpoint of ``iteration``, checked against this run's fingerprint.

    ``weights_only=True``: tensors and plain containers only, so loading a checkpoint never runs code from it.
    Raises ``ValueError`` naming the file and the sections that differ, or what is wrong with the file.
    """
    path = checkpoint_path(run_dir, agent, iteration)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (unpickling errors come in many types)
        raise ValueError(f"cannot load checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}; "
                         f"delete it to resume from the one before") from None
    theirs = state.get("fingerprint", {}) if isinstance(state, dict) else {}
    differ = sorted(k for k in prints if theirs.get(k) != prints[k])
    if differ:
        raise ValueError(f"checkpoint {path} was written by a run with a different {', '.join(differ)}; resume "
                         f"with the configuration that wrote it, or start a new run directory")
    return state


class AgentCheckpoints:
    """The checkpointer of one agent process (``loop.Checkpointer``): ``state()`` gives what to write."""

    def __init__(self, run_dir: Path, agent: int, state: Callable[[], dict[str, Any]], prints: dict[str, str],
                 every: int, keep: int, last: Optional[int] = None):
        self.run_dir, self.agent, self.state, self.prints = Path(run_dir), agent, state, prints
        self.every, self.keep, self.last = every, keep, last
        self.where = str(Path(run_dir) / "checkpoints")

    def save(self, iteration: int) -> None:
        state = self.state()
        assert state["iteration"] == iteration, (state["iteration"], iteration)
        save(self.run_dir, self.agent, state, self.prints, self.keep)
        self.last = iteration
