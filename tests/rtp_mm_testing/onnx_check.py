"""An exported vision ONNX file against the eager torch visual module, computed in the test itself.

The project's export code measures its own file (``onnx_export.check_onnx``) on random pixels; a test that only reads
those numbers back cannot catch a bug in that measurement. Here the file is opened with onnxruntime directly and
compared with eager torch on real preprocessed images, with nothing from ``rtp_mm.trt_builders`` in the loop. The
eager module is the reference: it is itself checked against transformers / the golden outputs in tests/test_vision."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from rtp_mm_testing.llava import SIZES, image
from rtp_mm_testing.shared import golden

BATCHES = (1, 3, 8)


def assert_onnx_matches_eager(
    vision, onnx_path: Path, images: list, tolerance: float, batches: tuple[int, ...] = BATCHES
) -> dict[int, float]:
    """Run ``onnx_path`` (``pixel_values`` -> ``image_embeds``) with onnxruntime on the CPU and ``vision``'s eager fp32
    visual module on the same pixel batches of exactly 1, 3 and 8 rows, built by ``vision.stack`` from ``images``
    (PIL, preprocessed by ``vision``; cycled where there are fewer rows than the batch); assert equal shapes and a max
    abs error <= ``tolerance`` per batch. Returns batch -> max abs error."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["image_embeds"]
    pixels = [vision.preprocess(im) for im in images]
    module = vision.visual_module()
    errors = {}
    for batch in batches:
        # llava-next images stack to several rows (views) each: stack cycled images until there are enough rows
        chosen, rows = [], None
        for p in itertools.cycle(pixels):
            chosen.append(p)
            rows = vision.stack(chosen)
            if rows.shape[0] >= batch:
                break
        rows = rows[:batch].to("cpu", torch.float32).contiguous()
        with torch.no_grad():
            expected = module(rows).to(torch.float64).numpy()
        (got,) = session.run(["image_embeds"], {"pixel_values": rows.numpy()})
        assert got.dtype == np.float32, (batch, got.dtype)
        assert got.shape == expected.shape, (batch, got.shape, expected.shape)
        err = float(np.abs(got.astype(np.float64) - expected).max())
        assert err <= tolerance, f"batch {batch}: onnxruntime vs eager max abs error {err:.3g} > {tolerance:g}"
        errors[batch] = err
    return errors


def case_images(case: str) -> list[Image.Image]:
    """Real pictures for an export case: several sizes for llava (llava-next: different tile counts), the golden
    inputs for qwen_vl and chatglm4v."""
    if case.startswith("llava"):
        return [image(size, seed) for seed, size in enumerate(SIZES)]
    folder = golden("qwen_vl" if case == "qwen_vl" else "glm4v")
    return [Image.open(folder / f"img{i}.png") for i in range(3)]
