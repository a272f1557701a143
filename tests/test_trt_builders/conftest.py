"""The vision checkpoints the ONNX/TensorRT tests export: tiny llava-1.5 and llava-next (built here) and the golden
qwen_vl and glm4v checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtp_mm_testing.shared import golden


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """case -> (vision family, checkpoint folder): tiny llava-1.5 and llava-next written by rtp_mm_testing.llava, and
    the golden qwen_vl and glm4v checkpoints."""
    from rtp_mm_testing.llava import processor, save_llava, tiny_llava

    root = tmp_path_factory.mktemp("ckpt")
    for kind in ("llava", "next"):
        save_llava(tiny_llava(kind, seed=6), processor(kind), root / kind, "save_pretrained")
    return {
        "llava-1.5": ("llava", root / "llava"),
        "llava-next": ("llava", root / "next"),
        "qwen_vl": ("qwen_vl", golden("qwen_vl", "checkpoint")),
        "chatglm4v": ("chatglm4v", golden("glm4v", "checkpoint")),
    }
