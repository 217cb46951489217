"""Which iterations end with a combination round, and its number: the one place that turns an iteration into a
round (every combiner, both simulator engines and the liveness board count rounds this way)."""

from __future__ import annotations

from typing import Optional


def combine_round(iteration: int, every: int) -> Optional[int]:
    """The combination round that completes iteration ``iteration`` (1-based), or ``None`` for a local step
    (``strategy.combine_every=every``: every ``every``-th iteration combines)."""
    return None if iteration % every else iteration // every - 1
