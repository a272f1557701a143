"""The vision-engine cache and the VIT_TRT start-up path, without a GPU.

- The cache decision: a stored entry matches only its exact key; a TensorRT version, GPU, compute capability,
  precision, batch profile or weights change is a miss whose reasons name the change; a corrupted file is a miss.
- ``VIT_TRT=1`` where TensorRT or a CUDA GPU is missing stops start-up (``LLM`` and ``rtp-mm build-vit``) with the
  error saying what is missing; nothing falls back to PyTorch.
- The build/cache/runtime wiring end to end against ``fake_tensorrt`` (the TensorRT API slice rtp-mm calls, run by
  onnxruntime on the CPU): build once, hit on restart, rebuild on a version change with a log line naming it, engine
  output equal to eager, an engine disagreeing with eager (cosine < 0.999) is refused and not cached.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from rtp_mm import LLM, ModelConfig
from rtp_mm.cli import main as cli_main
from rtp_mm.model_types import read_config_json
from rtp_mm.trt_builders import build as build_mod
from rtp_mm.trt_builders import tensorrt_engine
from rtp_mm.trt_builders.build import VitBuildConfig, backend_encode_fn, ensure_entry
from rtp_mm.trt_builders.cache import EngineCache, EngineKey, weights_sha256
from rtp_mm.trt_builders.tensorrt_engine import EngineBuildError, TensorRTUnavailable
from rtp_mm.vision.base import load_vision_model
from rtp_mm_testing import fake_tensorrt
from rtp_mm_testing.fake_tensorrt import MANIFEST_FIELDS
from rtp_mm_testing.shared import GOLDEN, require

QWEN_VL = GOLDEN / "qwen_vl" / "checkpoint"


def qwen_vl_vision():
    require(QWEN_VL)
    return load_vision_model("qwen_vl", str(QWEN_VL), read_config_json(QWEN_VL), "", "cpu", torch.float32)


@pytest.fixture(scope="module")
def vision():
    return qwen_vl_vision()


def key(**changes) -> EngineKey:
    base = EngineKey(
        model_type="qwen_vl",
        backend="tensorrt",
        weights_sha256="ab" * 32,
        pixel_shape=(3, 28, 28),
        export_options={"opset": 17},
        precision="fp16",
        batch_profile=(1, 8, 16),
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
    )
    return dataclasses.replace(base, **changes)


def store(cache: EngineCache, k: EngineKey, tmp_path) -> None:
    (tmp_path / "plan").write_bytes(b"engine bytes")
    cache.store(k, {"vision.engine": tmp_path / "plan"}, {"onnx_bytes": 1}, {"cosine": 1.0}, 1.5)


# ---- the cache decision --------------------------------------------------------------------------------------------
def test_an_entry_matches_only_its_exact_key(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    store(cache, key(), tmp_path)
    found = cache.lookup(key())
    assert found.hit and (found.folder / "vision.engine").read_bytes() == b"engine bytes"
    manifest = json.loads((found.folder / "manifest.json").read_text())
    assert set(manifest["key"]) == MANIFEST_FIELDS
    assert manifest["build_seconds"] == 1.5 and manifest["measured"] == {"cosine": 1.0}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"tensorrt_version": "10.5.0"}, "tensorrt_version '10.3.0' -> '10.5.0'"),
        ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "compute_capability '9.0' -> '8.0'"),
        ({"compute_capability": "8.9"}, "compute_capability '9.0' -> '8.9'"),
        ({"weights_sha256": "cd" * 32}, "vision weights changed"),
        ({"precision": "bf16"}, "precision 'fp16' -> 'bf16'"),
        ({"batch_profile": (1, 4, 8)}, "batch_profile [1, 8, 16] -> [1, 4, 8]"),
    ],
)
def test_a_changed_system_is_a_miss_that_says_what_changed(tmp_path, change, words):
    cache = EngineCache(tmp_path / "cache")
    store(cache, key(), tmp_path)
    found = cache.lookup(key(**change))
    assert not found.hit and found.manifest is None
    assert any(words in reason for reason in found.reasons), found.reasons
    assert cache.lookup(key()).hit  # the old entry is still there for the old system


def test_a_corrupted_entry_is_a_miss(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    store(cache, key(), tmp_path)
    (cache.lookup(key()).folder / "vision.engine").write_bytes(b"truncated")
    found = cache.lookup(key())
    assert not found.hit and "corrupt" in found.reasons[0] and "vision.engine" in found.reasons[0]
    store(cache, key(), tmp_path)  # a rebuild replaces it
    assert cache.lookup(key()).hit


def test_changing_one_vision_weight_changes_the_key(vision):
    module = vision.visual_module()
    before = weights_sha256(module)
    assert weights_sha256(module) == before
    param = next(iter(module.parameters()))
    with torch.no_grad():
        param.view(-1)[0] += 1e-3
    try:
        assert weights_sha256(module) != before
    finally:
        with torch.no_grad():
            param.view(-1)[0] -= 1e-3


# ---- VIT_TRT=1 without TensorRT / GPU: a clear start-up error ------------------------------------------------------
@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_vit_trt_without_tensorrt_stops_start_up(no_tensorrt):
    require(QWEN_VL)
    with pytest.raises(TensorRTUnavailable, match=r"VIT_TRT=1: the tensorrt Python package cannot be imported.*"):
        LLM(ModelConfig(model_type="qwen_vl", ckpt_path=str(QWEN_VL), weight_type="FP32"), vit_trt=True)


def test_vit_trt_without_a_gpu_stops_start_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match=r"needs an NVIDIA GPU, but torch .* sees no CUDA device"):
        LLM(ModelConfig(model_type="qwen_vl", ckpt_path=str(QWEN_VL), weight_type="FP32"), vit_trt=True)


def test_an_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(fake_tensorrt, "__version__", "8.6.1")
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 8.6.1 is installed, rtp-mm needs 10\+"):
        tensorrt_engine.require_tensorrt()


def test_build_vit_cli_without_tensorrt_says_what_is_missing(no_tensorrt, tmp_path, capsys):
    require(QWEN_VL)
    argv = ["build-vit", "--model-type", "qwen_vl", "--checkpoint-path", str(QWEN_VL), "--cache-path", str(tmp_path)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "tensorrt Python package cannot be imported" in err and "--onnx-only" not in err
    assert not any(tmp_path.iterdir())


# ---- build -> cache -> runtime, with the fake TensorRT -------------------------------------------------------------
@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(fake_tensorrt, "BUILDS", [])
    monkeypatch.setattr(fake_tensorrt, "OUTPUT_NOISE", 0.0)
    monkeypatch.setattr(tensorrt_engine, "cuda_identity", lambda device: ("Fake GPU", "9.0"))
    return fake_tensorrt


def trt_config(tmp_path, **kw) -> VitBuildConfig:
    kw = {"precision": "fp32", "batch_profile": (1, 2, 4), "device": "cpu", **kw}
    return VitBuildConfig(model_type="qwen_vl", cache_path=tmp_path / "cache", **kw)


def test_engine_is_built_once_then_loaded_and_matches_eager(fake_trt, vision, tmp_path):
    lines: list[str] = []
    folder, manifest = ensure_entry(vision, trt_config(tmp_path), log=lines.append, progress=lines.append)
    assert len(fake_trt.BUILDS) == 1 and manifest.measured["cosine"] > 0.9999
    assert {b["batch"] for b in manifest.measured["batches"]} == {1, 2, 4}
    build = fake_trt.BUILDS[0]
    assert build["flags"] == 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert build["workspace"] == 4096 << 20 and fake_trt.BuilderFlag.TF32 in build["cleared"]
    assert any("Tactic selection (3/3)" in line or "Tactic selection (0/3)" in line for line in lines)
    assert (folder / "vision.engine").is_file() and (folder / "onnx" / "vision.onnx").is_file()
    assert (tmp_path / "cache" / "timing.cache").read_bytes() == b"+"
    assert manifest.key.gpu_name == "Fake GPU" and manifest.key.tensorrt_version == fake_trt.__version__
    assert manifest.export["checks"] and manifest.build_seconds > 0

    lines.clear()
    again, _ = ensure_entry(vision, trt_config(tmp_path), log=lines.append)
    assert again == folder and len(fake_trt.BUILDS) == 1 and "using the cached entry" in lines[0]

    # The engine's encode, 5 images split over the profile's max batch of 4: rows equal eager's.
    images = [torch.randn(vision.pixel_shape(), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    got = backend_encode_fn(vision, trt_config(tmp_path))(images)
    want = vision.encode(images)
    assert len(got) == 5 and all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))
    assert len(fake_trt.BUILDS) == 1


def test_a_tensorrt_version_change_rebuilds_and_logs_it(fake_trt, vision, tmp_path, monkeypatch):
    ensure_entry(vision, trt_config(tmp_path))
    monkeypatch.setattr(fake_trt, "__version__", "11.0.1")
    lines: list[str] = []
    folder, manifest = ensure_entry(vision, trt_config(tmp_path), log=lines.append)
    assert len(fake_trt.BUILDS) == 2 and manifest.key.tensorrt_version == "11.0.1"
    assert "tensorrt_version '10.99.0' -> '11.0.1'" in lines[0]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_an_engine_disagreeing_with_eager_is_refused(fake_trt, vision, tmp_path, monkeypatch):
    monkeypatch.setattr(fake_trt, "OUTPUT_NOISE", 5.0)
    with pytest.raises(EngineBuildError, match=r"disagrees with eager torch: cosine 0\.\d+ < 0.999.*not cached"):
        ensure_entry(vision, trt_config(tmp_path))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_vit_trt_start_up_serves_through_the_engine(fake_trt, tmp_path, monkeypatch):
    """LLM(vit_trt=True) builds through the cache and the engine's encode stage runs it (fp32 graph on the fake)."""
    require(QWEN_VL)
    monkeypatch.setattr(build_mod, "precision_name", lambda dtype: "fp32")
    llm = LLM(
        ModelConfig(model_type="qwen_vl", ckpt_path=str(QWEN_VL), weight_type="FP32"),
        vit_trt=True,
        trt_cache_path=str(tmp_path / "cache"),
        vit_trt_batch=(1, 2, 4),
        kv_cache_mem_mb=16,
        skip_tokenizer_init=True,
    )
    try:
        encoder = llm.client.call(lambda engine: engine.encode_stage.encoder)
        assert len(fake_trt.BUILDS) == 1 and encoder.max_batch == 4
        pixels = [torch.zeros(llm.vision.pixel_shape())]
        assert torch.allclose(encoder.encode(pixels)[0], llm.vision.encode(pixels)[0], atol=1e-4)
    finally:
        llm.shutdown()


def test_an_fp16_engine_is_built_from_the_fp16_graph(fake_trt, tmp_path):
    """Strongly typed builds: the precision is the parsed graph's dtype (TensorRT 11 has no FP16 builder flag)."""
    vision16 = load_vision_model("qwen_vl", str(QWEN_VL), read_config_json(QWEN_VL), "", "cpu", torch.float16)
    folder, manifest = ensure_entry(vision16, trt_config(tmp_path, precision="fp16"))
    parsed = fake_trt.BUILDS[0]["onnx"]
    assert parsed.parent.name == "onnx-fp16" and (folder / "onnx-fp16" / "vision.onnx").is_file()
    import onnx

    graph = onnx.load(str(folder / "onnx-fp16" / "vision.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert fake_trt.BuilderFlag.TF32 not in fake_trt.BUILDS[0]["cleared"]
    assert manifest.key.precision == "fp16" and manifest.measured["cosine"] > 0.999
    rows = backend_encode_fn(vision16, trt_config(tmp_path, precision="fp16"))([torch.zeros(vision16.pixel_shape())])
    assert rows[0].dtype == torch.float16
