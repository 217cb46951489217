"""The package as a user installs it from a wheel (not the editable checkout)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_wheel_carries_every_hydra_config(tmp_path):
    """A built wheel holds every conf/**/*.yaml as dif_maml_dist/conf/..., so ``pip install .`` (as in the Docker
    image) can compose every config group. Catches a config group added to conf/ but not to pyproject.toml's
    package list, which only an editable install would hide."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dif_maml_dist-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"dif_maml_dist/conf/{p.relative_to(REPO / 'conf').as_posix()}"
                for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == expected
    assert "dif_maml_dist/conf/config.yaml" in shipped and "dif_maml_dist/train.py" in zipfile.ZipFile(wheel).namelist()
