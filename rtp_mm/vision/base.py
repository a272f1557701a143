"""The contract between vision encoders and the shared LLM engine.

A vision family (llava, qwen_vl, chatglm4v) provides a ``VisionModel``: it turns one image into pixel values
(``preprocess``, the original implementation's exact resize/crop/normalise), pixel values into rows of the LLM's
input-embedding space (``encode``, batched over images), and a prompt with placeholder spans into the expanded token
ids plus the ``MultimodalInput`` rows spliced over them (``expand``). Preprocessing runs where images arrive
(``inputs.prepare_image``); ``encode`` and ``expand`` run in the engine's encode stage (``llm/engine/multimodal.py``),
which batches images across requests and caches their rows by content hash.

``encode`` is three pieces so that another backend (onnxruntime, TensorRT; ``rtp_mm.trt_builders``) can replace the
middle one: ``stack`` (Python: images -> one pixel batch), ``visual_module`` (a pure tensor graph, exported to ONNX
with a dynamic batch axis), ``unstack`` (Python: the batch's features -> each image's rows, e.g. llava-next's merge).

A family's declaration (``rtp_mm.llm.models``) names its loader; ``load_vision_model`` builds a checkpoint's encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from rtp_mm.llm.engine.multimodal import PreparedPrompt
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.family import resolve

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, used by all three families
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(
    image: Any, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] float32: / 255, then (x - mean) / std per channel.

    In NumPy float32, whose elementwise ops round exactly as torch's (bit-identical results), because preprocessing
    runs on pool threads: a torch op over a large image would start an OpenMP team on each of them, and extra teams
    make the engine thread's OpenMP workers sleep between parallel regions (llm/engine/loop.py)."""
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((x - m) / s))


class VisionModel(ABC):
    """One checkpoint's vision stack. Implementations are eager torch, any device/dtype. ``preprocess`` is called
    from any thread (it must not touch shared state); ``encode`` and ``expand`` only from the engine thread."""

    family: str = ""

    @abstractmethod
    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image -> pixel values for ``encode`` (e.g. [3, H, W]; llava-next anyres: [tiles, 3, H, W])."""

    @abstractmethod
    def visual_module(self) -> torch.nn.Module:
        """The whole exportable visual stack: a pixel batch [N, 3, H, W] (model dtype/device) -> features
        [N, rows, hidden]. No Python-side per-image logic and no data-dependent control flow inside, so it traces
        to one ONNX graph whose batch axis is dynamic."""

    @abstractmethod
    def stack(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        """The batch for ``visual_module``, in the model's dtype and device (llava-next: every view of every image,
        concatenated, so N is the total view count)."""

    @abstractmethod
    def unstack(self, pixel_values: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its embedding rows [rows, llm_hidden] in the LLM dtype, from the features of ``stack``'s batch
        (in the model's dtype and device)."""

    @abstractmethod
    def pixel_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one row of ``stack``'s batch."""

    @torch.inference_mode()
    def encode(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pixel values of several images -> per image, its embedding rows [rows, llm_hidden] in the LLM's dtype."""
        if not pixel_values:
            return []
        return self.unstack(pixel_values, self.visual_module()(self.stack(pixel_values)))

    @abstractmethod
    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        """Replace the prompt's image placeholders (in order) by the rows of ``embeds``. Raises InvalidRequest on a
        count mismatch or an unclosed span. ``hashes`` are the images' content hashes (prefix-cache keys)."""

    def image_placeholder(self, index: int) -> str:
        """The text a chat message's image part (OpenAI ``image_url``) becomes in the rendered prompt."""
        raise NotImplementedError(f"{type(self).__name__} does not render image parts")


def load_vision_model(
    family: str, ckpt_path: str, config: dict, extra_data_path: str, device: str, dtype: torch.dtype
) -> VisionModel | None:
    """The VisionModel of a family's checkpoint (the loader its declaration names), or None for a text family."""
    declared = FAMILIES[family].vision
    if not declared:
        return None
    loader = resolve(declared)
    return loader(ckpt_path=ckpt_path, config=config, extra_data_path=extra_data_path, device=device, dtype=dtype)
