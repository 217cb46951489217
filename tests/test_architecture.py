"""The package's layout holds: layers import only downward, no import cycles, and only ``comm`` touches
``torch.distributed`` (the contracts are in pyproject.toml; the README's "How it works" shows the layout)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "dif_maml_dist"


def test_import_contracts_hold():
    """import-linter's contracts (layers, no cycles, graphs without torch): catches an import that reaches up a
    layer (e.g. gossip importing the engine, as churn.py once did), a new import cycle, or torch in graphs/."""
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "KEPT" in done.stdout


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_comm_uses_torch_distributed():
    """The agent loop, the gossip step, the run's files and the rest see the ``comm`` transports, never
    ``torch.distributed`` (import-linter cannot forbid a subpackage of an external package, so this reads every
    module's imports): catches a process group or store call slipping out of ``comm/``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "comm":
            continue
        if any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in _imports(path)):
            offenders.append(str(relative))
    assert offenders == [], f"torch.distributed imported outside comm/: {offenders}"
    # the check itself sees an import when there is one
    assert "torch.distributed" in _imports(PACKAGE / "comm" / "process.py")


#: Above this many lines a module says why it is one module (a paragraph starting "Size:" in its docstring).
LONG_MODULE_LINES = 300


def test_long_modules_say_why():
    """A module that grows past ~300 lines either splits by job or states why it is one: catches the flat
    folder's slow growth into files that hold several concerns (issue 24)."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > LONG_MODULE_LINES and "\nSize: " not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert unexplained == [], f"modules over {LONG_MODULE_LINES} lines with no 'Size:' reason: {unexplained}"


def test_public_names_are_exported_from_the_package_root():
    """``from dif_maml_dist import load_run, TaskFamily, ...`` works for every name the root lists, and each is the
    object its own module defines: catches an export map left behind when a module moves (the layout moved
    load_run from evaluate.py to run/saved.py)."""
    import importlib

    import dif_maml_dist

    assert set(dif_maml_dist.__all__) >= {"load_run", "Config", "TaskFamily", "TaskSampler", "TaskSet", "TaskBatch"}
    for name in dif_maml_dist.__all__:
        module = importlib.import_module(dif_maml_dist._PUBLIC[name])
        assert getattr(dif_maml_dist, name) is getattr(module, name), name
