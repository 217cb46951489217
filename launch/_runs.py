"""Run folders of the experiment scripts in launch/: one per distinct run, whatever it was run with."""

from __future__ import annotations

import hashlib
from pathlib import Path


def keyed(parent: Path, name: str, overrides: list[str]) -> Path:
    """``parent/name-KEY``, KEY a short hash of the run's whole override list: a run made with any other setting
    (iterations, evaluation, compressor, ...) lives in another folder and is never reported as this one; ``name``
    keeps the folder findable by eye."""
    key = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]
    return parent / f"{name}-{key}"


def log_of(run_dir: Path) -> Path:
    """Where a script keeps a run's output: beside its folder, which the run itself must find new."""
    return run_dir.with_name(run_dir.name + ".log")


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its summary). A folder without one is what a failed or killed
    attempt left: it is moved aside, with its log, to ``NAME.failed-N`` (kept to read, never deleted), since
    train refuses a folder that already holds metrics and would refuse every retry."""
    if (run_dir / "summary.json").is_file():
        return True
    if run_dir.exists():
        n = 1
        while run_dir.with_name(f"{run_dir.name}.failed-{n}").exists():
            n += 1
        aside = run_dir.with_name(f"{run_dir.name}.failed-{n}")
        run_dir.rename(aside)
        if log_of(run_dir).exists():
            log_of(run_dir).rename(log_of(aside))
    return False
