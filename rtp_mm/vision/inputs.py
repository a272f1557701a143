"""Images on their way to the engine: decoding, content hashing and the family's preprocessing.

This runs on the caller's side (the server's image pool, the offline API's threads), never on the engine thread and
never on the event loop, so the engine receives ready pixel values (``EncoderInput``) and only encodes them (its
``EncodeStage``). The hash identifies the decoded picture: the encoder cache and the prefix cache key on it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.engine.multimodal import DEFAULT_MAX_BATCH, EncoderInput, ImageEncoder
from rtp_mm.vision.base import VisionModel

EncodeFn = Callable[[list[Any]], list[torch.Tensor]]  # pixel values of several images -> rows per image


def to_pil(image: Any, index: int = 0) -> Any:
    """A PIL image from a PIL image, raw encoded bytes, or a local file path (the offline API's inputs)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, bytes | bytearray):
            return Image.open(io.BytesIO(image))
        if isinstance(image, str | Path):
            return Image.open(image)
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequest(f"image {index} is not a decodable image: {e}") from None
    raise InvalidRequest(f"image {index} must be a PIL image, bytes or a file path, got {type(image).__name__}")


def image_hash(image: Any) -> str:
    """Content hash of a decoded image: mode, size and pixels (the same picture in PNG or JPEG bytes that decode to
    different pixels hashes differently, as it must: its embeddings differ)."""
    h = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def prepare_image(model: VisionModel, image: Any, index: int = 0) -> EncoderInput:
    """Decode (lazy files are decoded here), hash and preprocess one image for ``model``'s encoder."""
    pil = to_pil(image, index)
    try:
        pil.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidRequest(f"image {index} is not a decodable image: {e}") from None
    return EncoderInput(model.preprocess(pil), image_hash(pil))


def image_encoder(
    model: VisionModel, encode_fn: EncodeFn | None = None, max_batch: int = DEFAULT_MAX_BATCH
) -> ImageEncoder:
    """The engine's view of ``model``: its eager ``encode`` (or a backend's, e.g. TensorRT) and ``expand``."""
    return ImageEncoder(encode=encode_fn or model.encode, expand=model.expand, max_batch=max_batch)


__all__ = ["EncodeFn", "ImageEncoder", "image_encoder", "image_hash", "prepare_image", "to_pil"]
