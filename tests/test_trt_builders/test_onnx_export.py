"""ONNX export of every vision family's visual module (tiny llava-1.5 and llava-next from rtp_mm_testing.llava, the
golden qwen_vl and glm4v checkpoints): onnx.checker, onnxruntime against eager torch at batch 1, 3 and 8, the
onnxruntime backend through the engine's encode stage, a tampered file caught by the check, fp32 export of bf16,
external data.

The eager encoders are themselves checked against transformers / the golden outputs in tests/test_vision; here eager
torch is the oracle of the exported graph, and the pre-refactor ``encode`` body is the oracle of the refactor."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from rtp_mm.errors import ConfigError
from rtp_mm.llm.engine.multimodal import EncodeStage
from rtp_mm.trt_builders import onnx_export
from rtp_mm.trt_builders.onnx_export import ExportError, ExportOptions, check_onnx, export_onnx
from rtp_mm.trt_builders.ort_backend import OnnxRuntimeEncoder, backend_encode_fn
from rtp_mm.vision.base import VisionModel, load_vision_model
from rtp_mm.vision.inputs import image_encoder, prepare_image
from rtp_mm.vision.llava import TiledImage
from rtp_mm_testing.golden_legacy import golden_case
from rtp_mm_testing.llava import SIZES, image
from rtp_mm_testing.onnx_check import assert_onnx_matches_eager, case_images

CASES = ["llava-1.5", "llava-next", "qwen_vl", "chatglm4v"]
TOLERANCE = 1e-4


def _load(family: str, path: Path, dtype: torch.dtype = torch.float32) -> VisionModel:
    config = json.loads((path / "config.json").read_text())
    return load_vision_model(family, str(path), config, "", "cpu", dtype)


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory) -> dict[str, tuple[VisionModel, onnx_export.ExportReport]]:
    """Each case's VisionModel (fp32, CPU) and the report of its export with the default options."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for case, (family, path) in checkpoints.items():
        if family != "llava":
            golden_case(path.parent.name)  # skips when the golden data is absent
        vision = _load(family, path)
        out[case] = (vision, export_onnx(vision, root / f"{case}.onnx"))
    return out


@pytest.mark.parametrize("case", CASES)
def test_export_is_valid_onnx_and_matches_eager(exported, case):
    vision, report = exported[case]
    onnx.checker.check_model(str(report.onnx_path))
    model = onnx.load(str(report.onnx_path))
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("pixel_values", "image_embeds")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph_output.type.tensor_type.shape.dim[0].dim_param == "batch"
    halves = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    assert not any(t.data_type in halves for t in model.graph.initializer)
    assert report.onnx_bytes == report.onnx_path.stat().st_size and not Path(f"{report.onnx_path}.data").exists()
    assert report.pixel_shape == vision.pixel_shape()
    with torch.no_grad():
        eager = vision.visual_module()(vision.stack([vision.preprocess(im) for im in case_images(case)]))
    assert report.output_shape == tuple(eager.shape[1:])
    # The oracle, computed here independently of onnx_export: the file run by onnxruntime directly against the eager
    # visual module (the reference, itself checked against transformers / golden outputs in tests/test_vision) on
    # real preprocessed images at batch 1, 3 and 8.
    errors = assert_onnx_matches_eager(vision, report.onnx_path, case_images(case), TOLERANCE)
    # Secondary: the report states what the export measured (its own check, on random pixels).
    assert [c.batch for c in report.checks] == list(errors) == [1, 3, 8]
    for c in report.checks:
        assert c.max_abs_err <= TOLERANCE and c.cosine > 0.99999, c


@pytest.mark.parametrize("case", CASES)
def test_onnxruntime_backend_rows_match_eager_encode(exported, case):
    """Real images through stack / onnxruntime / unstack give eager ``encode``'s rows (shape, dtype, values)."""
    vision, report = exported[case]
    pixels = [vision.preprocess(im) for im in case_images(case)]
    backend = backend_encode_fn(vision, OnnxRuntimeEncoder(report.onnx_path, threads=1))
    for got, expected in zip(backend(pixels), vision.encode(pixels), strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert float((got - expected).abs().max()) <= TOLERANCE
    assert backend([]) == []


def _pre_refactor_encode(vision: VisionModel, pixel_values: list) -> list[torch.Tensor]:
    """The ``encode`` bodies before visual_module/stack/unstack existed, verbatim but for attribute paths."""
    if vision.family == "llava":
        views = [p.views if isinstance(p, TiledImage) else p[None] for p in pixel_values]
        tower = vision.visual.tower
        weight = tower.embeddings.patch_embedding.weight
        feats = tower(torch.cat(views).to(weight.device, weight.dtype), vision.settings.feature_layers)
        if not vision.settings.keep_cls:
            feats = feats[:, 1:]
        for i, linear in enumerate(vision.visual.projector):
            feats = linear(feats if i == 0 else vision.visual.act(feats))
        per_image = feats.split([v.shape[0] for v in views])
        return [vision._merge(p, f) for p, f in zip(pixel_values, per_image, strict=True)]
    module = vision.visual if vision.family == "qwen_vl" else vision.model
    return list(module(torch.stack(pixel_values).to(vision.device, vision.dtype)).unbind(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_encode_is_the_pre_refactor_computation(checkpoints, case, dtype):
    family, path = checkpoints[case]
    if family != "llava":
        golden_case(path.parent.name)
    vision = _load(family, path, dtype)
    pixels = [vision.preprocess(im) for im in case_images(case)]
    with torch.inference_mode():
        expected = _pre_refactor_encode(vision, pixels)
    got = vision.encode(pixels)
    assert len(got) == len(expected)
    assert all(torch.equal(g, e) and g.dtype == e.dtype == dtype for g, e in zip(got, expected, strict=True))


def test_encode_stage_with_onnxruntime_backend_mixed_tile_counts(exported):
    """llava-next images with 5 and 3 views encoded in one batch by the engine's encode stage, onnxruntime backend."""
    vision, report = exported["llava-next"]
    images = [image(SIZES[0], 40), image(SIZES[1], 41), image(SIZES[2], 42)]
    assert len({vision.preprocess(im).views.shape[0] for im in images}) > 1
    backend = backend_encode_fn(vision, OnnxRuntimeEncoder(report.onnx_path))
    stage = EncodeStage(image_encoder(vision, backend))
    placeholder = min(vision.settings.image_token_ids)
    stage.add(1, [placeholder] * len(images), tuple(prepare_image(vision, im, k) for k, im in enumerate(images)))
    ((_, prepared),), failed = stage.step()
    assert failed == [] and stage.stats.encode_batches == 1
    rows = [mm.embeds for mm in prepared.mm_inputs]
    for got, im in zip(rows, images, strict=True):
        (expected,) = vision.encode([vision.preprocess(im)])
        assert got.shape == expected.shape and float((got - expected).abs().max()) <= TOLERANCE


def test_tampered_weight_fails_the_check_naming_the_batch(exported, tmp_path):
    vision, report = exported["llava-1.5"]
    model = onnx.load(str(report.onnx_path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))  # the patch embedding
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5  # one element: a uniform shift of every channel would vanish in the next LayerNorm
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save_model(model, str(tampered))
    with pytest.raises(ExportError, match=r"at batch 3: max abs error .* > tolerance 0.0001"):
        check_onnx(vision, tampered, ExportOptions(check_batches=(3, 1)))


def test_half_precision_model_exports_fp32_from_a_copy(checkpoints, tmp_path):
    vision = _load("llava", checkpoints["llava-next"][1], torch.bfloat16)
    report = export_onnx(vision, tmp_path / "bf16.onnx")
    model = onnx.load(str(report.onnx_path))
    float_types = {t.data_type for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64}
    assert float_types == {onnx.TensorProto.FLOAT}
    assert {p.dtype for p in vision.visual_module().parameters()} == {torch.bfloat16}  # the served model is untouched
    assert all(c.max_abs_err <= TOLERANCE for c in report.checks)


def test_weights_past_the_single_file_limit_go_to_one_external_file(exported, tmp_path, monkeypatch):
    vision, _ = exported["chatglm4v"]
    path = tmp_path / "big.onnx"
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT", 0)
    report = export_onnx(vision, path, ExportOptions(check_batches=(2,)))
    data = tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert report.onnx_bytes == path.stat().st_size + data.stat().st_size and data.stat().st_size > path.stat().st_size
    assert report.checks[0].max_abs_err <= TOLERANCE
    monkeypatch.undo()
    export_onnx(vision, path, check=False)  # small again: one self-contained file, the stale data file removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]
    assert check_onnx(vision, path, ExportOptions(check_batches=(1,)))[0].max_abs_err <= TOLERANCE


def test_options_and_report_are_json(exported, tmp_path):
    _, report = exported["qwen_vl"]
    assert ExportOptions().as_dict() == {"opset": 17, "check_batches": [1, 3, 8], "tolerance": 1e-4}
    as_json = json.loads(json.dumps(report.as_dict()))
    assert as_json["onnx_path"] == str(report.onnx_path) and as_json["output_shape"] == [256, 128]
    assert [c["batch"] for c in as_json["checks"]] == [1, 3, 8]
    for bad in (dict(opset=13), dict(check_batches=()), dict(check_batches=(0,)), dict(tolerance=0.0)):
        with pytest.raises(ConfigError):
            ExportOptions(**bad)


def test_export_failure_is_an_export_error(exported, tmp_path, monkeypatch):
    vision, _ = exported["chatglm4v"]

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="chatglm4v visual module failed: unsupported operator"):
        export_onnx(vision, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []  # no file, no leftover temporary folder
