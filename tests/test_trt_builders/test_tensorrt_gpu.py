"""Real TensorRT on a real GPU (marked ``gpu``; skipped where ``import tensorrt`` fails or CUDA is missing).

On a GPU box: ``pip install 'tensorrt>=10'`` for its CUDA, then ``make test PYTEST_ARGS='-m gpu'``. Builds the golden
Qwen-VL and GLM-4V visual stacks at fp32 and fp16, checks the engines against eager torch on the GPU, the cache hit on
a second build, and a VIT_TRT=1 start-up whose vision rows match the eager backend.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rtp_mm.model_types import read_config_json
from rtp_mm.trt_builders.build import PRECISIONS, VitBuildConfig, backend_encode_fn, ensure_entry
from rtp_mm.vision.base import load_vision_model
from rtp_mm_testing.shared import GOLDEN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
        reason="needs TensorRT 10+ and a CUDA GPU",
    ),
]

CASES = {"qwen_vl": GOLDEN / "qwen_vl" / "checkpoint", "chatglm4v": GOLDEN / "glm4v" / "checkpoint"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model_type", sorted(CASES))
def test_engine_matches_eager_and_is_cached(model_type, precision, tmp_path):
    path = CASES[model_type]
    vision = load_vision_model(model_type, str(path), read_config_json(path), "", "cuda", PRECISIONS[precision])
    cfg = VitBuildConfig(model_type=model_type, cache_path=tmp_path, precision=precision, batch_profile=(1, 4, 8))
    folder, manifest = ensure_entry(vision, cfg)
    assert manifest.measured["cosine"] >= 0.999
    major, minor = torch.cuda.get_device_capability()
    assert manifest.key.compute_capability == f"{major}.{minor}"
    lines: list[str] = []
    again, _ = ensure_entry(vision, cfg, log=lines.append)
    assert again == folder and "using the cached entry" in lines[0]
    pixels = [torch.randn(vision.pixel_shape(), generator=torch.Generator().manual_seed(i)) for i in range(11)]
    got = backend_encode_fn(vision, cfg)(pixels)  # 11 images: split over the max batch of 8
    want = vision.encode(pixels)
    for g, w in zip(got, want, strict=True):
        cosine = torch.nn.functional.cosine_similarity(g.float().flatten(), w.float().flatten(), dim=0)
        assert g.dtype == w.dtype and g.shape == w.shape and cosine > 0.999


def test_vit_trt_start_up_on_the_gpu(tmp_path):
    from rtp_mm import LLM, ModelConfig

    path = CASES["qwen_vl"]
    llm = LLM(
        ModelConfig(model_type="qwen_vl", ckpt_path=str(path), weight_type="FP16"),
        device="cuda",
        vit_trt=True,
        trt_cache_path=str(tmp_path),
        kv_cache_mem_mb=64,
        skip_tokenizer_init=True,
    )
    try:
        pixels = [torch.randn(llm.vision.pixel_shape(), generator=torch.Generator().manual_seed(0))]
        encoder = llm.client.call(lambda engine: engine.encode_stage.encoder)  # the TensorRT encode the engine runs
        got, want = encoder.encode(pixels)[0], llm.vision.encode(pixels)[0]
        assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0) > 0.999
    finally:
        llm.shutdown()
