"""VisionRunner: a VisionModel plus what serving needs around it: content hashes, an encoder-output cache with a byte
budget (LRU), and one lock so concurrent requests never run the encoder at the same time.

``prepare`` is called on the caller's thread (the offline API's, or a server worker thread: never the event loop).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import InvalidRequest
from rtp_mm.vision.base import PreparedPrompt, VisionModel

DEFAULT_CACHE_BYTES = 256 << 20


def to_pil(image: Any) -> Any:
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
        raise InvalidRequest(f"image is not a decodable image: {e}") from None
    raise InvalidRequest(f"image must be a PIL image, bytes or a file path, got {type(image).__name__}")


def image_hash(image: Any) -> str:
    """Content hash of a decoded image: mode, size and pixels (the same picture in PNG or JPEG bytes that decode to
    different pixels hashes differently, as it must: its embeddings differ)."""
    h = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class VisionRunner:
    def __init__(self, model: VisionModel, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.model = model
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.images_encoded = 0

    def prepare(self, prompt_ids: list[int], images: list[Any]) -> PreparedPrompt:
        pil = [to_pil(image) for image in images]
        hashes = [image_hash(image) for image in pil]
        return self.model.expand(list(prompt_ids), self.embeddings(pil, hashes), hashes)

    def embeddings(self, images: list[Any], hashes: list[str]) -> list[torch.Tensor]:
        """Embedding rows per image; each distinct image not in the cache is encoded once, in one batch."""
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for h in hashes:
                if h in self._cache:
                    self._cache.move_to_end(h)
                    found[h] = self._cache[h]
        missing = list(dict.fromkeys(h for h in hashes if h not in found))
        self.cache_hits += len(hashes) - sum(1 for h in hashes if h in missing)
        if missing:
            first = {h: images[hashes.index(h)] for h in missing}
            pixels = [self.model.preprocess(first[h]) for h in missing]
            with self._lock:
                encoded = self.model.encode(pixels)
                self.images_encoded += len(missing)
                self.cache_misses += len(missing)
                for h, rows in zip(missing, encoded, strict=True):
                    found[h] = rows
                    self._insert(h, rows)
        return [found[h] for h in hashes]

    def _insert(self, key: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.cache_bytes:
            return
        self._cache[key] = rows
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def stats(self) -> dict[str, int]:
        return {
            "vision_cache_hits": self.cache_hits,
            "vision_cache_misses": self.cache_misses,
            "vision_images_encoded": self.images_encoded,
            "vision_cache_bytes": self._cached_bytes,
        }
