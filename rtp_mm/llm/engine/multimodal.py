"""Images in the engine: what a request carries, and vision encoding as an engine stage.

The engine never runs a vision tower of its own and never imports ``rtp_mm.vision``: the builder hands it an
``ImageEncoder`` (two callables of the family's VisionModel, possibly with an onnxruntime/TensorRT ``encode``). A
request with images waits in the ``EncodeStage`` until every image has its embedding rows; then ``expand`` replaces
the prompt's placeholders by those rows and the request goes on to the scheduler like any other.

Each engine step encodes at most one batch (``max_batch`` images, oldest requests first, across requests), so a burst
of images interleaves with the decode steps of running requests instead of stalling them. Rows are cached by image
content hash (LRU within a byte budget): an image repeated in a request, across requests or later is encoded once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rtp_mm.errors import InvalidRequest, RtpMmError

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_MAX_BATCH = 16


@dataclass(frozen=True)
class EncoderInput:
    """One preprocessed image: the family's pixel values and the content hash of the decoded picture."""

    pixels: Any  # what the family's ``encode`` takes for one image (a tensor, or llava-next's tiled views)
    content_hash: str


@dataclass(frozen=True)
class MultimodalInput:
    """Embedding rows spliced over the token embeddings of prompt positions [offset, offset + rows)."""

    embeds: torch.Tensor  # [num_rows, hidden]
    offset: int  # index in the prompt of the first row
    content_hash: str = ""  # identity of the image, for prefix-cache keys ("" = never shared)


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt with its images expanded. Invariant: every ``mm_inputs[i]`` covers rows inside ``token_ids``."""

    token_ids: list[int]
    mm_inputs: list[MultimodalInput] = field(default_factory=list)
    # Explicit rotary position of every prompt token (chatglm4v: all rows of an image share one position); None =
    # 0..n-1. Generated tokens continue from the last prompt position + 1.
    positions: list[int] | None = None


@dataclass(frozen=True)
class ImageEncoder:
    """A family's vision stack as the engine sees it."""

    # pixel values of several images -> each image's embedding rows [rows, hidden] (one batched forward)
    encode: Callable[[list[Any]], list[torch.Tensor]]
    # (prompt ids, rows per image, content hashes) -> the expanded prompt; InvalidRequest on a placeholder mismatch
    expand: Callable[[list[int], list[torch.Tensor], list[str]], PreparedPrompt]
    max_batch: int = DEFAULT_MAX_BATCH


@dataclass
class _Waiting:
    request_id: int
    token_ids: list[int]
    images: tuple[EncoderInput, ...]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # held here, so eviction cannot starve a request

    def missing(self) -> list[EncoderInput]:
        return [image for image in self.images if image.content_hash not in self.rows]


@dataclass
class EncodeStats:
    cache_hits: int = 0
    cache_misses: int = 0
    images_encoded: int = 0
    encode_batches: int = 0
    encode_seconds: float = 0.0


class EncodeStage:
    """Requests waiting for image rows, in arrival order. Invariants: ``_cached_bytes`` is the size of ``_cache``'s
    tensors and never exceeds ``cache_bytes``; a waiting request holds every row found for it so far."""

    def __init__(self, encoder: ImageEncoder, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.encoder = encoder
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._waiting: dict[int, _Waiting] = {}
        self.stats = EncodeStats()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting)

    def add(self, request_id: int, token_ids: list[int], images: tuple[EncoderInput, ...]) -> None:
        waiting = _Waiting(request_id, token_ids, images)
        pending = {h for w in self._waiting.values() for h in (i.content_hash for i in w.missing())}
        for image in images:
            key = image.content_hash
            if key in waiting.rows or key in self._cache or key in pending:
                self.stats.cache_hits += 1  # encoded once: a repeat, an earlier image, or one already waiting
            else:
                self.stats.cache_misses += 1
                pending.add(key)
            self._take_cached(waiting, key)
        self._waiting[request_id] = waiting

    def remove(self, request_id: int) -> bool:
        return self._waiting.pop(request_id, None) is not None

    def step(self) -> tuple[list[tuple[int, PreparedPrompt]], list[tuple[int, RtpMmError]]]:
        """Encode one batch; returns (requests now expanded, requests that failed), both by request id."""
        batch: dict[str, EncoderInput] = {}
        for waiting in self._waiting.values():
            for image in waiting.missing():
                if len(batch) < self.encoder.max_batch:
                    batch.setdefault(image.content_hash, image)
        failed: list[tuple[int, RtpMmError]] = []
        if batch:
            failed = self._encode(batch)
        ready: list[tuple[int, PreparedPrompt]] = []
        for waiting in [w for w in self._waiting.values() if not w.missing()]:
            del self._waiting[waiting.request_id]
            hashes = [image.content_hash for image in waiting.images]
            rows = [waiting.rows[h] for h in hashes]
            try:
                ready.append((waiting.request_id, self.encoder.expand(waiting.token_ids, rows, hashes)))
            except RtpMmError as e:
                failed.append((waiting.request_id, e))
        return ready, failed

    def _encode(self, batch: dict[str, EncoderInput]) -> list[tuple[int, RtpMmError]]:
        start = time.perf_counter()
        try:
            rows = self.encoder.encode([image.pixels for image in batch.values()])
            if len(rows) != len(batch):
                raise RuntimeError(f"the vision encoder returned {len(rows)} outputs for {len(batch)} images")
        except Exception as e:  # the requests needing these images fail; the engine and the others go on
            error = e if isinstance(e, RtpMmError) else RtpMmError(f"the vision encoder failed: {e!r}")
            failed = [w.request_id for w in self._waiting.values() if any(i.content_hash in batch for i in w.images)]
            for request_id in failed:
                del self._waiting[request_id]
            return [(request_id, error) for request_id in failed]
        self.stats.encode_seconds += time.perf_counter() - start
        self.stats.encode_batches += 1
        self.stats.images_encoded += len(batch)
        for key, value in zip(batch, rows, strict=True):
            self._insert(key, value)
            for waiting in self._waiting.values():
                if any(i.content_hash == key for i in waiting.images):
                    waiting.rows[key] = value
        return []

    def _take_cached(self, waiting: _Waiting, key: str) -> None:
        if key in self._cache:
            self._cache.move_to_end(key)
            waiting.rows[key] = self._cache[key]

    def _insert(self, key: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.cache_bytes or key in self._cache:
            return
        self._cache[key] = rows
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def report(self) -> dict[str, Any]:
        s = self.stats
        return {
            "vision_cache_hits": s.cache_hits,
            "vision_cache_misses": s.cache_misses,
            "vision_images_encoded": s.images_encoded,
            "vision_encode_batches": s.encode_batches,
            "vision_encode_seconds": s.encode_seconds,
            "vision_cache_bytes": self._cached_bytes,
            "vision_cache_entries": len(self._cache),
            "vision_waiting_requests": len(self._waiting),
        }


def check_image_count(num_placeholders: int, num_images: int, what: str) -> None:
    """The one message for a prompt whose image placeholders and images do not pair up."""
    if num_placeholders != num_images:
        raise InvalidRequest(
            f"the prompt has {num_placeholders} image placeholders ({what}) but {num_images} images were given"
        )
