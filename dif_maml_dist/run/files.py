"""Files that readers never see half-written: written beside their place, then renamed into it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, Tensor]) -> None:
    """``torch.save`` a flat dict of tensors (loadable with ``weights_only=True``) via temp file and rename.

    Each tensor is copied first: ``torch.save`` writes a view's whole storage, and the simulator's views share
    one ``[agents, P]`` storage, so every agent's file would otherwise hold every agent."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def unwritable(folder: Path) -> Optional[str]:
    """Why no file can be created in ``folder``, or None if one can. Tried rather than read off the permission
    bits, which say nothing for root, a read-only mount or /proc; the probe is an unnamed temporary file, so
    nothing is left behind either way."""
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    return None
