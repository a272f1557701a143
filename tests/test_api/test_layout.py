"""The repo's layout never shadows an installed package, whatever folder Python starts in.

Python started in the repo root puts the root first on ``sys.path``, and pytest puts ``tests/`` there
(``pythonpath``): a folder named like an installed package (``kernels/``, which transformers 5 imports; ``llm/``, PyPI's
``llm``) would be imported in its place. So the only package at the root is ``rtp_mm``, no test folder or helper module
has an importable name, and the server's start-up path, run from the root with an empty cache, imports this repo's
code under ``rtp_mm`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _importable(names: list[str]) -> dict[str, str | None]:
    """name -> where an interpreter started outside the repo finds it (None: not importable)."""
    code = (
        "import importlib.util, json, sys;"
        "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) or "
        "(str(list(importlib.util.find_spec(n).submodule_search_locations)) if importlib.util.find_spec(n) else None)"
        " for n in sys.argv[1:]}))"
    )
    out = subprocess.run([sys.executable, "-c", code, *names], check=True, capture_output=True, text=True, cwd="/")
    return json.loads(out.stdout)


def test_the_only_package_at_the_root_is_rtp_mm():
    entries = [p for p in ROOT.iterdir() if not p.name.startswith(".")]
    names = [p.stem for p in entries if p.is_dir() or p.suffix == ".py"]
    found = {n: where for n, where in _importable(names).items() if where is not None and n != "rtp_mm"}
    assert not found, f"repo-root names that shadow installed packages when Python starts here: {found}"
    packages = [p.name for p in entries if p.is_dir() and (p / "__init__.py").exists()]
    assert packages == ["rtp_mm"], packages


def test_no_test_folder_or_helper_has_an_importable_name():
    names = [p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    names += [p.stem for p in TESTS.glob("*.py") if p.name != "conftest.py"]
    found = {n: where for n, where in _importable(names).items() if where is not None}
    assert not found, f"tests/ is on pytest's pythonpath; these names shadow installed packages: {found}"


STARTUP = textwrap.dedent(
    """
    import json, sys, urllib.request
    import transformers, kernels, rtp_mm
    from rtp_mm.config import Settings
    from rtp_mm.server.app import BackgroundServer, create_app

    with BackgroundServer(create_app(None, Settings.from_env())) as url:
        health = json.load(urllib.request.urlopen(url + "/health"))
        body = json.dumps({"prompt": "Hello", "top_k": 1, "max_new_tokens": 4}).encode()
        answer = json.load(urllib.request.urlopen(urllib.request.Request(url + "/", data=body)))
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    report = {"health": health, "answer": answer, "kernels": kernels.__file__, "files": files, "prefix": sys.prefix}
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_startup_from_the_repo_root_imports_this_repo_only_as_rtp_mm(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "RTP_MM_CACHE_DIR": "", "KV_CACHE_MEM_MB": "128"}
    for name in ("CHECKPOINT_PATH", "MODEL_TYPE", "TOKENIZER_PATH", "PYTHONPATH"):
        env.pop(name, None)
    # `python -c` from the root puts the root first on sys.path, as `python -m rtp_mm.start_server` does.
    proc = subprocess.run(
        [sys.executable, "-c", STARTUP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["health"] == "ok"
    assert report["answer"]["finished"] is True and report["answer"]["aux_info"]["output_len"] == 4
    venv = Path(report["prefix"]).resolve()  # a venv inside the checkout (CI's .ci-venv) holds installed code

    def in_repo(path: str | None) -> bool:
        if not path or not Path(path).is_absolute():
            return False
        resolved = Path(path).resolve()
        return resolved.is_relative_to(ROOT) and not resolved.is_relative_to(venv)

    assert not in_repo(report["kernels"]), report["kernels"]
    foreign = {n: path for n, path in report["files"].items() if in_repo(path) and n.split(".")[0] != "rtp_mm"}
    assert not foreign, f"modules of this repo imported under a foreign top-level name: {foreign}"


def test_no_product_file_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "rtp_mm").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"split these by responsibility: {long}"
