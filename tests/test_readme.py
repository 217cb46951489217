"""The README's printed samples against what the code prints now (``tests/check_readme.py``)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_readme_samples_match_what_the_code_prints():
    """Reruns every command marked ``readme-check`` in the README (the quick start's progress line: a 6-agent
    torchrun job of 200 iterations) and compares the lines shown with the lines printed, clock times and speeds
    aside. Catches a sample left behind by a change to the training, the evaluation or the log format (the
    quick start showed an iteration-200 line whose test losses the code no longer printed)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "check_readme.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 stale line(s)" in proc.stdout
