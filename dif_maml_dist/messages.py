"""How the runtime words what went wrong: every mistake and failure is said in one line (README "Mistakes are
reported in one line"), so an exception from a library or a user's code is cut to its first line."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message, first line only and at most ``limit`` characters; its type's name when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
