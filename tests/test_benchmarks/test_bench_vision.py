"""``rtp-mm bench --vision``: the harness on the test-only fake encoder (through the real CLI, ONNX columns included),
and the bench's tiny checkpoints: names and shapes equal to the golden original-layout checkpoints built from the same
config, and every one loads in rtp-mm as its MODEL_TYPE."""

from __future__ import annotations

import json

import pytest
import torch

import rtp_mm.benchmarks.vision as bench_vision
from rtp_mm import LLM, ModelConfig
from rtp_mm.benchmarks.vision_cases import CASES, BenchCase, glm4v_shapes, qwen_vl_shapes
from rtp_mm.cli import main as cli_main
from rtp_mm_testing.fake_vision import MODEL_TYPE, ROWS, make_checkpoint, registered
from rtp_mm_testing.shared import GOLDEN, golden

FAKE_CASE = BenchCase(
    MODEL_TYPE, lambda p: make_checkpoint(p, seed=14), lambda cfg, i: [1, 5 + i, cfg["image_token_index"], 7]
)


def test_cli_runs_the_vision_bench_and_writes_its_section(tmp_path, monkeypatch):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## rtp bench (text engine)\n\nkept\n")
    report = tmp_path / "vision.json"
    monkeypatch.setitem(bench_vision.CASES, MODEL_TYPE, FAKE_CASE)
    argv = ["bench", "--vision", "--families", f"{MODEL_TYPE},nope", "--batches", "1,2", "--repeats", "1"]
    with registered():
        rc = cli_main([*argv, "--output", str(out), "--json", str(report)])
    assert rc == 1  # the unregistered family is an error row, the others still ran
    results = json.loads(report.read_text())["results"]
    rows = [r for r in results if r["family"] == MODEL_TYPE]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rows_per_image"] == ROWS and r["images_per_s"] > 0 and 0 < r["ttft_ms_mean"] <= r["ttft_ms_max"]
        assert r["onnx_export_s"] > 0 and r["onnx_mb"] > 0 and r["onnx_max_abs_err"] <= 1e-4
        assert r["eager_images_per_s"] > 0 and r["ort_images_per_s"] > 0
    assert results[-1] == {"family": "nope", "error": "no vision encoder registered"}
    text = out.read_text()
    assert "kept" in text and bench_vision.SECTION_HEADING in text and f"| {MODEL_TYPE} | 2 | 6 |" in text
    ratio = rows[1]["ort_images_per_s"] / rows[1]["eager_images_per_s"]
    assert "| onnxruntime / eager |" in text and f"| {ratio:.2f}x |" in text  # the ONNX table, in the same section


def _golden_shapes(case: str) -> dict[str, tuple[int, ...]]:
    ckpt = GOLDEN / case / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    shapes = {}
    for shard in sorted(ckpt.glob("pytorch_model-*.bin")):
        shapes |= {k: tuple(v.shape) for k, v in torch.load(shard, map_location="cpu", weights_only=True).items()}
    return shapes


@pytest.mark.parametrize(("case", "shapes"), [("qwen_vl", qwen_vl_shapes), ("glm4v", glm4v_shapes)])
def test_tiny_layouts_match_the_golden_original_checkpoints(case, shapes):
    config = json.loads(golden(case, "checkpoint", "config.json").read_text())
    assert shapes(config) == _golden_shapes(case)


@pytest.mark.parametrize("family", sorted(CASES))
def test_bench_checkpoints_load_as_their_model_type(tmp_path, family):
    case = CASES[family]
    case.build(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    llm = LLM(
        ModelConfig(model_type=case.model_type, ckpt_path=str(tmp_path), weight_type="FP32", max_seq_len=2048),
        kv_cache_mem_mb=64,
        skip_tokenizer_init=True,
    )
    try:
        assert llm.model_type.family == family and llm.model_type.vision
        assert all(0 <= t < llm.client.model.spec.vocab_size for t in case.prompt(config, 0) if t >= 0)
    finally:
        llm.shutdown()
