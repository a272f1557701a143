"""Where the project's shared material lives, found one way for every test.

``shared/`` holds the seed (``seed/Config.md``) and the golden data (``golden/``): tiny checkpoints in their original
formats with the outputs of their original implementations. It sits next to the checkout on workstations and CI
(``../shared``), inside it on device machines (``shared/``), or wherever ``RTP_MM_SHARED`` points. A test that needs it
fails, never skips, when it is missing: a silent skip would let a green run hide that nothing was compared.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _find_shared() -> Path:
    """The first candidate holding ``seed/Config.md``; else the expected place (``../shared``) for the messages."""
    env = os.environ.get("RTP_MM_SHARED", "").strip()
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
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
