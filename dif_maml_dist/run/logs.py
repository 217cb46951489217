"""Where a process's log lines go: rank 0's progress to the terminal, every rank's own file in the run
directory, each line tagged with who wrote it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class _RankFormatter(logging.Formatter):
    def __init__(self, who: str):
        super().__init__(f"%(asctime)s [{who}] %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(rank: int, log_dir: Path | None = None, who: str | None = None) -> None:
    """Rank 0 logs progress to stderr; other ranks only warnings. Every rank logs INFO to its own file.

    Lines are tagged ``[agent RANK]`` (or ``who``, e.g. the simulator, which is all agents at once).
    """
    who = who or f"agent {rank}"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(_RankFormatter(who))
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / (f"agent{rank}.log" if who == f"agent {rank}" else "simulator.log"))
        fh.setFormatter(_RankFormatter(who))
        root.addHandler(fh)
