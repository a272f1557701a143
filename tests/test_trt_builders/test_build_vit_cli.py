"""``rtp-mm build-vit --onnx-only`` on a CPU-only machine, for every vision family (tiny llava-1.5 and llava-next, the
golden qwen_vl and glm4v checkpoints): an ONNX file whose onnxruntime outputs match eager within 1e-4 at batch 1, 3
and 8, a manifest with every field, a cache hit on the second run, a new entry when one vision weight changes; and
``VIT_BACKEND=onnxruntime`` serving from that entry."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from rtp_mm import LLM, ModelConfig
from rtp_mm.cli import main as cli_main
from rtp_mm.model_types import read_config_json
from rtp_mm.vision.base import load_vision_model
from rtp_mm_testing.fake_tensorrt import MANIFEST_FIELDS
from rtp_mm_testing.onnx_check import assert_onnx_matches_eager, case_images

CASES = ["llava-1.5", "llava-next", "qwen_vl", "chatglm4v"]


def build_vit(capsys, family: str, path, cache, *extra: str) -> tuple[int, dict | None, str]:
    argv = ["build-vit", "--model-type", family, "--checkpoint-path", str(path), "--cache-path", str(cache), *extra]
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.parametrize("case", CASES)
def test_onnx_only_build_matches_eager_and_is_cached(checkpoints, case, tmp_path, capsys):
    family, path = checkpoints[case]
    code, manifest, err = build_vit(capsys, family, path, tmp_path / "cache", "--onnx-only")
    assert code == 0, err
    assert set(manifest["key"]) == MANIFEST_FIELDS
    key = manifest["key"]
    assert (key["model_type"], key["backend"], key["precision"]) == (family, "onnxruntime", "fp32")
    assert len(key["weights_sha256"]) == 64 and key["export_options"]["check_batches"] == [1, 3, 8]
    entry = tmp_path / "cache" / manifest["entry"].rsplit("/", 1)[-1]
    onnx_path = entry / "onnx" / "vision.onnx"
    onnx.checker.check_model(str(onnx_path))
    assert json.loads((entry / "manifest.json").read_text())["key"] == key
    # The oracle, computed here independently of the build code: the cached file run by onnxruntime directly against
    # the eager visual module (the reference, itself checked against transformers / golden outputs in
    # tests/test_vision) on real preprocessed images at batch 1, 3 and 8.
    tolerance = 1e-4
    vision = load_vision_model(family, str(path), read_config_json(path), "", "cpu", torch.float32)
    errors = assert_onnx_matches_eager(vision, onnx_path, case_images(case), tolerance)
    # Secondary: the manifest states what the build measured (its own check, on random pixels).
    checks = manifest["export"]["checks"]
    assert [c["batch"] for c in checks] == list(errors) == [1, 3, 8]
    assert all(c["max_abs_err"] <= tolerance and c["cosine"] > 0.99999 for c in checks), checks
    assert manifest["measured"]["max_abs_err"] <= tolerance and manifest["build_seconds"] > 0

    code, again, err = build_vit(capsys, family, path, tmp_path / "cache", "--onnx-only")
    assert code == 0 and again["entry"] == manifest["entry"] and "using the cached entry" in err


def test_changing_one_vision_weight_changes_the_entry(checkpoints, tmp_path, capsys):
    family, path = checkpoints["llava-1.5"]
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    code, first, _ = build_vit(capsys, family, copy, tmp_path / "cache", "--onnx-only")
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if "vision_tower" in n and n.endswith("weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    code, second, err = build_vit(capsys, family, copy, tmp_path / "cache", "--onnx-only")
    assert code == 0 and second["entry"] != first["entry"]
    assert second["key"]["weights_sha256"] != first["key"]["weights_sha256"]
    assert "vision weights changed" in err


def test_bad_arguments_are_clear_errors(checkpoints, tmp_path, capsys):
    _, path = checkpoints["qwen_vl"]
    code, _, err = build_vit(capsys, "llama", path, tmp_path, "--onnx-only")
    assert code == 2 and "--model-type llama has no vision encoder" in err
    code, _, err = build_vit(capsys, "qwen_vl", tmp_path / "missing", tmp_path, "--onnx-only")
    assert code == 2 and "--checkpoint-path" in err and "does not exist" in err
    code, _, err = build_vit(capsys, "qwen_vl", path, tmp_path, "--onnx-only", "--min-batch", "4", "--max-batch", "2")
    assert code == 2 and "1 <= min <= opt <= max" in err


def test_vit_backend_onnxruntime_serves_from_the_cache(checkpoints, tmp_path):
    _, path = checkpoints["qwen_vl"]
    with LLM(
        ModelConfig(model_type="qwen_vl", ckpt_path=str(path), weight_type="FP32"),
        vit_backend="onnxruntime",
        trt_cache_path=str(tmp_path),
        kv_cache_mem_mb=16,
        skip_tokenizer_init=True,
    ) as llm:
        shape = llm.vision.pixel_shape()
        pixels = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
        encoder = llm.client.call(lambda engine: engine.encode_stage.encoder)  # what the engine's stage runs
        got, want = encoder.encode(pixels), llm.vision.encode(pixels)
        assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
