"""Packaging: one import namespace over the top-level folders; a regular install adds only ``rtp_mm``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "rtp_mm": "rtp_mm",
    "llm": "rtp_mm.llm",
    "vision": "rtp_mm.vision",
    "kernels": "rtp_mm.kernels",
    "trt_builders": "rtp_mm.trt_builders",
}


def test_every_package_folder_is_listed():
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    assert setuptools_cfg["package-dir"] == {v: k for k, v in FOLDERS.items()}
    for folder, namespace in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([namespace, *rel.parts]) if rel.parts else namespace
            assert name in listed, f"{init.parent} is a package but pyproject.toml does not list {name}"


@pytest.mark.slow
def test_regular_install_has_only_rtp_mm(tmp_path):
    target = tmp_path / "site"
    # Build from a copy: pip builds in-tree and would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"rtp_mm"}, top
    code = (
        "import rtp_mm, rtp_mm.llm, rtp_mm.vision, rtp_mm.kernels, rtp_mm.trt_builders, sys;"
        "from rtp_mm.llm.engine.scheduler import Scheduler;"
        f"assert rtp_mm.llm.__file__.startswith({str(target)!r}), rtp_mm.llm.__file__;"
        "assert 'llm' not in sys.modules and 'kernels' not in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    )
