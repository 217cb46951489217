"""Independent, reproducible random streams derived from one master seed, and the one registry of their names.

A stream is named by the keys that follow the seed: its :class:`Stream` number first, then whatever tells its
draws apart (an agent, a round). Numbers never repeat: numpy's seed sequences pad their entropy with zeros, so
``(seed, 4)`` and ``(seed, 4, 0)`` are the same stream, and two streams that shared a number would share draws
whatever keys followed. Results depend on these numbers: add new ones, never change one.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np


@unique  # a repeated number is an error at import, not an alias
class Stream(IntEnum):
    """Every random stream of a run (the further keys each one takes in brackets)."""

    TASKS = 1  #: an agent's training tasks (agent)
    INIT = 2  #: the initial models (none when shared; agent when per agent)
    EVAL = 3  #: the shared test tasks
    VALIDATION = 4  #: Omniglot's validation tasks
    MIXING = 5  #: the random starts from which a random schedule's mixing rate is measured
    COMPRESSION = 6  #: randk's indices and qsgd's rounding (sender, round)
    SCHEDULE = 7  #: a random schedule's graph of each round (round)
    MODULE_INIT = 8  #: a user's model, built under the global RNG seeded from here (none when shared; agent)
    MODEL_CHECK = 9  #: the one task on which the model is checked to fit the family's targets before a run


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys``; distinct keys give statistically independent streams."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def numpy_generator(seed: int, *keys: int) -> np.random.Generator:
    """A numpy ``Generator`` for the stream named by ``keys`` (for code without torch: the graphs)."""
    return np.random.default_rng([seed, *keys])


def generator(seed: int, *keys: int):
    """A CPU ``torch.Generator`` seeded for the stream named by ``keys``."""
    import torch  # here, so that the graphs (numpy only) can use this module without torch

    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g
