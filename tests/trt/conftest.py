"""Makes the vision tests' helpers (``test_llava``'s tiny llava checkpoints) and ``fake_tensorrt`` (next to this file)
importable from the trt tests."""

from __future__ import annotations

import sys
from pathlib import Path

for _folder in (Path(__file__).parent, Path(__file__).parents[1] / "vision"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """case -> (vision family, checkpoint folder): tiny llava-1.5 and llava-next written by test_llava's helpers, and
    the golden qwen_vl and glm4v checkpoints."""
    from golden_legacy import GOLDEN
    from test_llava import processor, save_llava, tiny_llava

    root = tmp_path_factory.mktemp("ckpt")
    for kind in ("llava", "next"):
        save_llava(tiny_llava(kind, seed=6), processor(kind), root / kind, "save_pretrained")
    return {
        "llava-1.5": ("llava", root / "llava"),
        "llava-next": ("llava", root / "next"),
        "qwen_vl": ("qwen_vl", GOLDEN / "qwen_vl" / "checkpoint"),
        "chatglm4v": ("chatglm4v", GOLDEN / "glm4v" / "checkpoint"),
    }
