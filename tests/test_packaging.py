"""The package as a user installs it from a wheel (not the editable checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_wheel_carries_every_module_and_hydra_config(tmp_path):
    """A built wheel holds every module of the package and every conf/**/*.yaml as dif_maml_dist/conf/..., so
    ``pip install .`` (as in the Docker image) can import and compose everything. Catches a subpackage or a config
    group added to the tree but not to pyproject.toml's package list, which only an editable install would hide
    (learning/algorithms/ was, once: the Docker image could not import the training command)."""
    # Built from a copy without build/: setuptools would otherwise reuse build/lib, where a module the package list
    # no longer names (or never named, after an editable build) may still lie.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "outputs", "multirun",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dif_maml_dist-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"dif_maml_dist/conf/{p.relative_to(REPO / 'conf').as_posix()}"
                for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == expected
    assert "dif_maml_dist/conf/config.yaml" in shipped and "dif_maml_dist/train.py" in zipfile.ZipFile(wheel).namelist()
    modules = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    assert modules == {p.relative_to(REPO).as_posix() for p in (REPO / "dif_maml_dist").rglob("*.py")}
