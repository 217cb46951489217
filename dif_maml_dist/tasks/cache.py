"""Decoded datasets cached as one tensor file, built once even when every rank of a node asks at the same time, and
rebuilt when the dataset it was built from has changed.

Caches live in a folder of their own (``data.cache_dir``), never in the dataset's folder, which may be read-only
(a cluster mounts its data so); a cache is named by a fingerprint of the dataset's files relative to its root,
so the same files moved or mounted elsewhere find their cache again."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from dif_maml_dist.messages import first_line


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed): one process at a time, e.g. one rank of a
    node decoding or downloading a dataset while the others wait. Released when the block ends, also on error."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


#: What a cache holds and how it is laid out; a cache written under another version is rebuilt.
FORMAT = 1


def default_cache_dir() -> Path:
    """Where caches go when ``data.cache_dir`` is not set: ``$XDG_CACHE_HOME/dif_maml_dist``, else
    ``~/.cache/dif_maml_dist``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dif_maml_dist"


def source_fingerprint(root: Path, files: Iterable[Path], **settings: Any) -> str:
    """A hash of what a cache is built from: every source file's path relative to ``root`` (so that it survives a
    move or another mount point), size and modification time, the settings (e.g. the image size) and
    :data:`FORMAT`. Any file added, removed, replaced or touched changes it."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{Path(f).relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read(path: Path) -> dict[str, Any]:
    """A cache file's contents; ``ValueError`` naming the file if it is not one of ours (never overwritten then)."""
    try:
        data = torch.load(path, weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 (truncated zip, foreign pickle, ...: all mean the same to the user)
        first = first_line(err, 200)
        raise ValueError(f"{path} is not a readable dataset cache ({first}); delete it and it is rebuilt from the "
                         f"dataset on the next run") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path} is not a dataset cache written by dif_maml_dist; move it away or delete it, and it "
                         f"is rebuilt from the dataset on the next run")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    # Atomically (a temporary name, then a rename), so a crash mid-build leaves no half-written cache; a process
    # that has the old file memory-mapped keeps reading it.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_build(path: Path, build: Callable[[], dict[str, Any]], fingerprint: Optional[str]) -> dict[str, Any]:
    """The dict of tensors/lists saved at ``path``; built by ``build()`` and saved first if the file is missing or
    was built from other sources (``fingerprint``, from :func:`source_fingerprint`; ``None`` when the sources are
    gone, and the cache is then used as it is).

    All ranks of a torchrun job start together and would all decode the images; an exclusive lock on
    ``path.lock`` lets one build while the others wait, then find the file. The load is ``weights_only`` (no code
    runs) and memory-mapped, so the ranks of a node share one copy in the page cache. A file at ``path`` that is
    not a readable cache is an error naming it, and is left alone.
    """
    path = Path(path)
    if path.is_file():
        data = _read(path)
        if fingerprint is None or data.get("fingerprint") == fingerprint:
            return data
    assert fingerprint is not None, f"no cache at {path} and no sources to build one from"
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as err:  # read-only, another user's, or /proc: a setting to change, not a traceback
        raise ValueError(f"cannot write the dataset cache into {path.parent} ({err.strerror or err}): set "
                         f"data.cache_dir=DIR to a folder you can write to") from None
    with exclusive(lock):
        if path.is_file():  # built or rebuilt by another rank meanwhile?
            if _read(path).get("fingerprint") == fingerprint:
                return torch.load(path, weights_only=True, mmap=True)
            print(f"{path} was built from other files than the dataset holds now: rebuilding it", file=sys.stderr,
                  flush=True)
        _write(path, {**build(), "fingerprint": fingerprint})
    return torch.load(path, weights_only=True, mmap=True)


def load_cached(cache_dir: Optional[str | Path], name: str, build: Callable[[], dict[str, Any]],
                fingerprint: Optional[str], legacy: Optional[Path] = None) -> dict[str, Any]:
    """The cache ``NAME-<fingerprint>.pt`` in ``cache_dir`` (``None``: :func:`default_cache_dir`), built by
    ``build()`` if missing; see :func:`load_or_build`. The dataset's folder is never written.

    ``fingerprint`` is ``None`` when the dataset's sources are gone and only ``legacy`` is left: a cache that
    earlier versions wrote inside the dataset folder, read as it is. With the sources there, ``legacy`` is not
    used: it was fingerprinted with absolute paths, so it cannot be checked against the files."""
    if fingerprint is None:
        assert legacy is not None and legacy.is_file(), f"{name}: neither the dataset's files nor a cache"
        return load_or_build(legacy, build, None)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return load_or_build(folder / f"{name}-{fingerprint[:32]}.pt", build, fingerprint)
