"""onnxruntime as a vision backend: an exported visual module (``onnx_export``) run on the CPU, plugged into the
engine's image encoder (``encode``, in place of the eager one) through ``backend_encode_fn``, shared with TensorRT.

Only the visual module changes backend: ``VisionModel.stack`` and ``unstack`` (per-image Python such as llava-next's
tile merge) stay eager, so a backend's rows differ from eager ``encode`` only by the graph's numerics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rtp_mm.errors import CheckpointError
from rtp_mm.vision.base import VisionModel
from rtp_mm.vision.inputs import EncodeFn


class OnnxRuntimeEncoder:
    """One onnxruntime CPU session over an exported visual module: [N, 3, H, W] -> [N, rows, hidden] fp32 torch.
    Invariant: the graph has exactly one input and one output (the export's ``pixel_values`` / ``image_embeds``).
    ``session.run`` is thread-safe, so one encoder may serve concurrent callers."""

    def __init__(self, onnx_path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise CheckpointError(
                f"{onnx_path}: a visual module has one input and one output, this graph has "
                f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: pixels.detach().to("cpu", torch.float32).contiguous().numpy()}
        (features,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(features)


def backend_encode_fn(vision: VisionModel, run: Callable[[torch.Tensor], torch.Tensor]) -> EncodeFn:
    """``encode`` with ``run`` in place of the eager visual module: pixel values list -> per-image rows via
    ``vision.stack`` / ``run`` / ``vision.unstack``. ``run``'s features are cast to the model's (LLM) dtype and device
    before ``unstack``, so the rows come back exactly where and as eager ``encode`` returns them."""
    weight = next(vision.visual_module().parameters())
    device, dtype = weight.device, weight.dtype

    def encode(pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        if not pixel_values:
            return []
        with torch.inference_mode():
            features = run(vision.stack(pixel_values)).to(device, dtype)
            return vision.unstack(pixel_values, features)

    return encode
