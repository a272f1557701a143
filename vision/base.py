"""The contract between vision encoders and the shared LLM engine.

A vision family (llava, qwen_vl, chatglm4v) provides a ``VisionModel``: it turns one image into pixel values
(``preprocess``, the original implementation's exact resize/crop/normalise), pixel values into rows of the LLM's
input-embedding space (``encode``, batched over images), and a prompt with placeholder spans into the expanded token
ids plus the ``MultimodalInput`` rows spliced over them (``expand``). The engine never runs a vision tower: it only
receives ``PreparedPrompt``s. ``VisionRunner`` (``rtp_mm.vision.runner``) adds hashing, the encoder-output cache and
batching around a VisionModel; the TensorRT backend replaces ``encode`` only.

Families register a loader in ``VISION_LOADERS``; ``load_vision_model`` builds the VisionModel of a checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rtp_mm.llm.engine.request import MultimodalInput


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt with its images expanded. Invariant: every ``mm_inputs[i]`` covers rows inside ``token_ids``."""

    token_ids: list[int]
    mm_inputs: list[MultimodalInput] = field(default_factory=list)
    # Explicit rotary position of every prompt token (chatglm4v: all rows of an image share one position); None =
    # 0..n-1. Generated tokens continue from the last prompt position + 1.
    positions: list[int] | None = None


class VisionModel(ABC):
    """One checkpoint's vision stack. Implementations are eager torch, any device/dtype, and thread-compatible
    (``encode`` is called under the VisionRunner's lock)."""

    family: str = ""

    @abstractmethod
    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image -> pixel values for ``encode`` (e.g. [3, H, W]; llava-next anyres: [tiles, 3, H, W])."""

    @abstractmethod
    def encode(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pixel values of several images -> per image, its embedding rows [rows, llm_hidden] in the LLM's dtype."""

    @abstractmethod
    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        """Replace the prompt's image placeholders (in order) by the rows of ``embeds``. Raises InvalidRequest on a
        count mismatch or an unclosed span. ``hashes`` are the images' content hashes (prefix-cache keys)."""

    def image_placeholder(self, index: int) -> str:
        """The text a chat message's image part (OpenAI ``image_url``) becomes in the rendered prompt."""
        raise NotImplementedError(f"{type(self).__name__} does not render image parts")


VisionLoader = Callable[..., VisionModel]
# family -> loader(ckpt_path: str, config: dict, extra_data_path: str, device, dtype) -> VisionModel
VISION_LOADERS: dict[str, VisionLoader] = {}


def load_vision_model(
    family: str, ckpt_path: str, config: dict, extra_data_path: str, device: str, dtype: torch.dtype
) -> VisionModel | None:
    """The VisionModel of a vision family's checkpoint, or None where the family has no encoder implemented yet."""
    loader = VISION_LOADERS.get(family)
    if loader is None:
        return None
    return loader(ckpt_path=ckpt_path, config=config, extra_data_path=extra_data_path, device=device, dtype=dtype)
