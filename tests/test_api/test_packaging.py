"""Packaging: every component is a subpackage of ``rtp_mm``, found by standard package discovery, and a regular
install adds nothing to site-packages but ``rtp_mm``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("llm", "vision", "kernels", "trt_builders", "server", "tokenizers", "benchmarks")


def test_standard_package_discovery_without_a_package_dir_mapping():
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in setuptools_cfg
    assert setuptools_cfg["packages"] == {"find": {"include": ["rtp_mm*"]}}
    for name in COMPONENTS:
        assert (ROOT / "rtp_mm" / name / "__init__.py").is_file(), f"rtp_mm/{name} is not a package"


@pytest.mark.slow
def test_regular_install_has_only_rtp_mm(tmp_path):
    target = tmp_path / "site"
    # Build from a copy: pip builds in-tree and would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
        + [str(source)],
        check=True,
        cwd=tmp_path,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"rtp_mm"}, top
    assets = {p.name for p in (target / "rtp_mm" / "server" / "playground").iterdir()}
    assert assets == {"index.html", "playground.js", "playground.css"}  # package data: the playground ships
    imports = ", ".join(f"rtp_mm.{name}" for name in COMPONENTS)
    code = (
        f"import rtp_mm, {imports}, sys;"
        "from rtp_mm.llm.engine.scheduler import Scheduler;"
        f"assert rtp_mm.llm.__file__.startswith({str(target)!r}), rtp_mm.llm.__file__;"
        "assert 'llm' not in sys.modules and 'kernels' not in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    )
