"""Makes the vision tests' helpers (``test_llava``'s tiny llava checkpoints) importable from the trt tests."""

from __future__ import annotations

import sys
from pathlib import Path

_VISION_TESTS = str(Path(__file__).parents[1] / "vision")
if _VISION_TESTS not in sys.path:
    sys.path.insert(0, _VISION_TESTS)
