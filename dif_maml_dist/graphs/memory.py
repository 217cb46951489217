"""Whether a K-agent network's dense K x K matrices fit this machine's memory, checked before they are built."""

from __future__ import annotations

import math
import os
from pathlib import Path

#: ``check_size`` budget, in dense K x K float64 matrices: A itself plus, at the peak (``mixing_rate``), the
#: shifted copy ``A.T - 1/K`` and LAPACK's working copy of it, plus one more for the caller (e.g.
#: ``strategy_weights`` or a simulator's copy). The boolean masks of ``check_weights`` are 1/8 of one each.
_DENSE_COPIES = 4


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes (the cgroup v2 limit if lower); ``None`` where it cannot be told."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            mem = min(mem, int(limit))
    except OSError:
        pass
    return mem if mem > 0 else None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_size(num_agents: int) -> None:
    """Refuse (one ``ValueError`` line) a K whose dense K x K weight matrices cannot fit in memory.

    Cheap: arithmetic only, so call it before building anything K x K (``build_topology`` does)."""
    k = num_agents
    if k < 1:
        raise ValueError(f"the topology needs at least 1 agent, got {k}")
    need = k * k * 8 * _DENSE_COPIES
    mem = physical_memory_bytes()
    if mem is not None and need > mem:
        k_max = math.isqrt(mem // (8 * _DENSE_COPIES))
        raise ValueError(f"{k} agents need about {_gib(need)} ({_DENSE_COPIES} dense {k}x{k} float64 weight "
                         f"matrices of {_gib(k * k * 8)}), but this machine has {_gib(mem)} of memory: use fewer "
                         f"agents (at most about {k_max} here)")
