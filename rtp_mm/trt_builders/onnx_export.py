"""ONNX export of a VisionModel's whole visual stack (``VisionModel.visual_module``), validated by ``onnx.checker``
and checked against eager torch with onnxruntime.

Exporter: the TorchScript one, ``torch.onnx.export(..., dynamo=False)``. torch 2.13's default (dynamo) exporter needs
the ``onnxscript`` package, which rtp-mm does not otherwise depend on, and buys nothing here: the visual modules are
plain feed-forward graphs (convolutions, LayerNorm, SDPA, matmuls) with static shapes except the batch axis, which is
exactly what tracing captures; ``dynamic_axes`` makes that axis symbolic. The tests export every family this way and
check it at several batch sizes. torch marks this exporter deprecated (2.9+): if a release drops it, move to
``dynamo=True`` and add ``onnxscript``.

The file is fp32 by default: a model served in fp16/bf16 or on a GPU is exported from an fp32 CPU copy, and only the
fp32 graph is checked with onnxruntime. ``dtype=torch.float16/bfloat16`` exports a copy in that dtype instead (inputs,
weights and output typed so): TensorRT builds strongly typed networks, whose precision is the graph's
(``tensorrt_engine``). Weights stay inside the ``.onnx`` file up to protobuf's 2 GiB message limit;
a larger model (EVA2-CLIP-E) keeps them in one external data file beside it, ``<name>.onnx.data``.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import ConfigError, RtpMmError
from rtp_mm.trt_builders.ort_backend import OnnxRuntimeEncoder
from rtp_mm.vision.base import VisionModel

INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_embeds"
BATCH_AXIS = "batch"
SINGLE_FILE_LIMIT = 2**31 - (64 << 20)  # weight bytes kept in the .onnx itself: 2 GiB less room for the graph
TRACE_BATCH = 2  # not 1: a traced size-1 batch can be specialised away by broadcasting
MIN_OPSET = 14  # the first opset with an export rule for scaled_dot_product_attention


class ExportError(RtpMmError):
    """The export failed, the file is not valid ONNX, or onnxruntime disagrees with eager torch beyond tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    """How a visual module is exported and checked; ``as_dict`` goes into the engine-cache manifest."""

    opset: int = 17
    check_batches: tuple[int, ...] = (1, 3, 8)
    tolerance: float = 1e-4  # max abs error of onnxruntime against eager torch, both fp32

    def __post_init__(self) -> None:
        if self.opset < MIN_OPSET:
            raise ConfigError(f"ExportOptions.opset={self.opset}: accepted {MIN_OPSET} or later (attention export)")
        if not self.check_batches or any(b < 1 for b in self.check_batches):
            raise ConfigError(f"ExportOptions.check_batches={self.check_batches}: accepted positive batch sizes")
        if not self.tolerance > 0:
            raise ConfigError(f"ExportOptions.tolerance={self.tolerance}: accepted a positive number")

    def as_dict(self) -> dict[str, Any]:
        return {"opset": self.opset, "check_batches": list(self.check_batches), "tolerance": self.tolerance}


@dataclass(frozen=True)
class BatchCheck:
    """onnxruntime against eager fp32 torch on seeded normal pixels, over the whole [batch, rows, hidden] output."""

    batch: int
    max_abs_err: float
    cosine: float


@dataclass(frozen=True)
class ExportReport:
    """One exported file. Invariant: ``onnx_bytes`` counts the .onnx and its external data file, if any."""

    onnx_path: Path
    onnx_bytes: int
    export_seconds: float  # fp32 copy + trace + write + onnx.checker (not the onnxruntime check)
    input_name: str
    output_name: str
    pixel_shape: tuple[int, int, int]  # one row of the batch: (3, H, W)
    output_shape: tuple[int, int]  # one row of the output: (rows, hidden)
    checks: tuple[BatchCheck, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnx_path": str(self.onnx_path),
            "onnx_bytes": self.onnx_bytes,
            "export_seconds": self.export_seconds,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "pixel_shape": list(self.pixel_shape),
            "output_shape": list(self.output_shape),
            "checks": [{"batch": c.batch, "max_abs_err": c.max_abs_err, "cosine": c.cosine} for c in self.checks],
        }


def export_onnx(
    vision: VisionModel,
    path: Path,
    options: ExportOptions = ExportOptions(),
    check: bool = True,
    dtype: torch.dtype = torch.float32,
) -> ExportReport:
    """Export ``vision.visual_module()`` to ``path`` (``dtype``, dynamic batch axis), validate it with onnx.checker
    and, with ``check`` (fp32 only), compare onnxruntime to eager torch at every ``options.check_batches``. Raises
    ExportError."""
    import onnx

    if check and dtype != torch.float32:
        raise ConfigError(f"export_onnx: the onnxruntime check runs on the fp32 graph, not {dtype}; pass check=False")
    path = Path(path)
    start = time.perf_counter()
    module = cpu_module(vision, dtype)
    pixel_shape = vision.pixel_shape()
    sample = sample_pixels(pixel_shape, TRACE_BATCH).to(dtype)
    with torch.no_grad():
        rows, hidden = module(sample).shape[1:]  # [batch, rows, hidden]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as tmp:
        traced = Path(tmp) / path.name  # torch writes any >2 GiB weights as one file per tensor beside it
        try:
            _trace(module, sample, traced, options.opset)
        except Exception as e:
            raise ExportError(f"ONNX export of the {vision.family} visual module failed: {e}") from e
        onnx_bytes = _write(onnx.load(str(traced)), path)
    try:
        onnx.checker.check_model(str(path))  # path-based: works past 2 GiB
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: onnx.checker rejects the exported {vision.family} visual module: {e}") from e
    seconds = time.perf_counter() - start
    checks = _check(module, pixel_shape, path, options) if check else ()
    return ExportReport(path, onnx_bytes, seconds, INPUT_NAME, OUTPUT_NAME, pixel_shape, (rows, hidden), checks)


def _trace(module: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated: chosen deliberately (module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            do_constant_folding=True,
        )


def check_onnx(vision: VisionModel, path: Path, options: ExportOptions) -> tuple[BatchCheck, ...]:
    """onnxruntime (CPU) against eager fp32 torch at each of ``options.check_batches``; raises ExportError naming the
    first batch whose max abs error exceeds ``options.tolerance``."""
    return _check(cpu_module(vision), vision.pixel_shape(), Path(path), options)


def _check(
    module: torch.nn.Module, pixel_shape: tuple[int, int, int], path: Path, options: ExportOptions
) -> tuple[BatchCheck, ...]:
    encoder = OnnxRuntimeEncoder(path)
    checks = []
    for batch in options.check_batches:
        pixels = sample_pixels(pixel_shape, batch)
        with torch.no_grad():
            expected = module(pixels)
        got = encoder(pixels)
        if got.shape != expected.shape:
            raise ExportError(
                f"{path}: at batch {batch} onnxruntime returns {tuple(got.shape)}, eager torch {tuple(expected.shape)}"
            )
        err, cosine = output_error(got, expected)
        if not err <= options.tolerance:  # also catches NaN
            raise ExportError(
                f"{path}: onnxruntime differs from eager torch at batch {batch}: max abs error {err:.3g} > tolerance "
                f"{options.tolerance:g} (cosine {cosine:.6f})"
            )
        checks.append(BatchCheck(batch, err, cosine))
    return tuple(checks)


def output_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, cosine similarity) of a backend's output against eager torch's, over all values, in float64."""
    got, expected = got.double().flatten(), expected.double().flatten()
    return float((got - expected).abs().max()), float(torch.nn.functional.cosine_similarity(got, expected, 0))


def sample_pixels(pixel_shape: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Deterministic normal pixels [batch, *pixel_shape] (seeded by the batch size): normalised images' scale."""
    return torch.randn((batch, *pixel_shape), generator=torch.Generator().manual_seed(batch))


def cpu_module(vision: VisionModel, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The visual module itself when it is on the CPU in ``dtype``, else a copy that is. The copy's tensors are made
    on the CPU in ``dtype`` directly (deepcopy's memo), so a model on a GPU is never duplicated in GPU memory."""
    module = vision.visual_module()
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return module
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(_cpu(p, dtype), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = _cpu(b, dtype)
    return copy.deepcopy(module, memo).eval()


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.to(dtype) if t.is_floating_point() else t.clone()


def _write(model: Any, path: Path) -> int:
    """Save ``model`` as ``path`` (weights inside up to SINGLE_FILE_LIMIT, else in ``<name>.data`` beside it,
    replacing any stale one). Returns the bytes written."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    weights = sum(math.prod(t.dims) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if weights > SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return path.stat().st_size + data.stat().st_size
    onnx.save_model(model, str(path))
    return path.stat().st_size
