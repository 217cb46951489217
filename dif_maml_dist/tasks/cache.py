"""Decoded datasets cached as one tensor file, built once even when every rank of a node asks at the same time."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed): one process at a time, e.g. one rank of a
    node decoding or downloading a dataset while the others wait. Released when the block ends, also on error."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The dict of tensors/lists saved at ``path``, built by ``build()`` and saved first if the file is missing.

    All ranks of a torchrun job start together and would all decode the images; an exclusive lock on
    ``path.lock`` lets one build while the others wait, then find the file. The file appears atomically
    (written to a temporary name, then renamed), so a crash mid-build leaves no half-written cache. The load is
    ``weights_only`` (no code runs) and memory-mapped, so the ranks of a node share one copy in the page cache.
    """
    path = Path(path)
    if not path.is_file():
        with exclusive(path.with_name(path.name + ".lock")):
            if not path.is_file():
                data = build()
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                try:
                    torch.save(data, tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    return torch.load(path, weights_only=True, mmap=True)
