"""Reruns the README's sample commands and fails when the lines the README shows no longer match what the code
prints.

    .venv/bin/python tests/check_readme.py [README.md]

A sample is a fenced block of printed lines preceded by a marker comment naming the command that prints them:

    <!-- readme-check: torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train train.iterations=200 -->

The command runs from the repository root with the virtualenv's ``bin`` first on ``PATH``, its run directory
pointed into a temporary folder (``hydra.run.dir`` is appended when the command is a training run that sets
none). Every line of the block must equal a line the command printed (stdout and stderr), after masking what
changes from run to run: clock times, iterations per second, the total in ``iter N/TOTAL`` (a short run prints
the figures of the long one's first evaluations), and the temporary run directory. Exit status 1 names each
line that no longer matches; 0 when all do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- readme-check: (.+?) -->\s*\n```[a-z]*\n(.*?)\n```", re.S)
#: What differs between two runs of the same command: replaced by a placeholder on both sides.
MASKS = [
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "HH:MM:SS"),
    (re.compile(r"\b\d+(\.\d+)? it/s\b"), "N it/s"),
    (re.compile(r"\biter (\d+)/\d+"), r"iter \1/TOTAL"),
]


def mask(line: str, run_dir: str) -> str:
    line = line.replace(run_dir, "RUN").rstrip()
    for pattern, placeholder in MASKS:
        line = pattern.sub(placeholder, line)
    return line


def samples(readme: str) -> list[tuple[str, list[str]]]:
    return [(m.group(1), m.group(2).splitlines()) for m in MARKER.finditer(readme)]


def run(command: str, run_dir: str) -> list[str]:
    if "dif_maml_dist.train" in command and "hydra.run.dir=" not in command:
        command += f" hydra.run.dir={run_dir}"
    venv_bin = ROOT / ".venv" / "bin"
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    return (proc.stdout + proc.stderr).splitlines()


def main(argv: list[str]) -> int:
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    found = samples(readme.read_text(encoding="utf-8"))
    if not found:
        print(f"check_readme: error: {readme} has no '<!-- readme-check: COMMAND -->' samples", file=sys.stderr)
        return 2
    stale = 0
    for command, shown in found:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = str(Path(tmp) / "run")
            printed = {mask(line, run_dir) for line in run(command, run_dir)}
            for line in shown:
                if mask(line, "RUN") not in printed:
                    stale += 1
                    print(f"STALE  {command}\n       README shows: {line}")
                    near = [p for p in printed if p.split("|")[0] == mask(line, "RUN").split("|")[0]]
                    print(f"       the code prints: {near[0] if near else '(no such line)'}")
                else:
                    print(f"ok     {line[:100]}")
    print(f"check_readme: {len(found)} sample(s), {stale} stale line(s)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
