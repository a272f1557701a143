"""Where the project's shared material lives, found one way for every test.

``shared/`` holds the seed (``seed/Config.md``) and the golden data (``golden/``): tiny checkpoints in their original
formats with the outputs of their original implementations. It sits next to the checkout on workstations and CI
(``../shared``), inside it on device machines (``shared/``), or wherever ``RTP_MM_SHARED`` points; a scratch clone of a
local checkout (``git clone . /tmp/x``) finds it next to the checkout it was cloned from. A test that needs it fails,
never skips, when it is missing: a silent skip would let a green run hide that nothing was compared.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _origin_checkout() -> Path | None:
    """The local checkout this one was cloned from, if its ``origin`` is a path on this machine."""
    try:
        url = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.removeprefix("file://") else None
    return path.resolve() if path is not None and path.is_dir() else None


def _find_shared() -> Path:
    """The first candidate holding ``seed/Config.md``; else the expected place (``../shared``) for the messages."""
    env = os.environ.get("RTP_MM_SHARED", "").strip()
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
    origin = None if env else _origin_checkout()
    if origin is not None:
        candidates += [origin.parent / "shared", origin / "shared"]
    for candidate in candidates:
        if (candidate / "seed" / "Config.md").is_file():
            return candidate
    return candidates[0]


SHARED = _find_shared()
GOLDEN = SHARED / "golden"
SEED_CONFIG = SHARED / "seed" / "Config.md"


def require(path: Path) -> Path:
    """``path`` (under SHARED) when it exists; otherwise the calling test fails saying where it was expected."""
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the shared data (seed and golden checkpoints) is expected at {SHARED} "
            f"(../shared next to the checkout, shared/ inside it, or RTP_MM_SHARED)",
            pytrace=False,
        )
    return path


def golden(*parts: str) -> Path:
    """An existing path under ``shared/golden`` (see ``require``)."""
    return require(GOLDEN.joinpath(*parts))
