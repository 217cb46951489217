"""Independent, reproducible random streams derived from one master seed."""

from __future__ import annotations

import numpy as np
import torch

# Stream names: keep them stable, since results depend on them.
TASKS, INIT, EVAL, VALIDATION = 1, 2, 3, 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys``; distinct keys give statistically independent streams."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for the stream named by ``keys``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g
