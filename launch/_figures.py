"""Figures for the launch scripts: matplotlib (the ``plots`` extra) with a file-only backend, when installed."""

from __future__ import annotations

import sys


def pyplot():
    """``matplotlib.pyplot`` drawing to files only, or ``None`` (said on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: CSVs written, no figure (pip install -e '.[plots]')", file=sys.stderr)
        return None
    return plt
