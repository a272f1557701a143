"""VisionRunner: a VisionModel plus what serving needs around it: content hashes, preprocessing in a worker pool, an
encoder-output cache with a byte budget (LRU), and ViT batching across concurrent requests.

``prepare`` is called on the caller's thread (the offline API's, or a server worker thread: never the event loop).
Batching works leader/follower: every caller queues the images it misses (an image already queued or being encoded
by another request is shared, not queued twice), then competes for the encoder lock; whoever holds it waits a short
gather window, takes every queued image of every request (up to ``max_batch``) and encodes them in one ``encode``
call. Callers whose images were taken by another leader just wait for their results.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import InvalidRequest
from rtp_mm.vision.base import PreparedPrompt, VisionModel

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_MAX_BATCH = 16
DEFAULT_GATHER_S = 0.002  # long enough for requests arriving together to meet, negligible next to a ViT forward
DEFAULT_PREPROCESS_WORKERS = 4

EncodeFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


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


def _load_and_hash(image: Any, index: int) -> tuple[Any, str]:
    """Runs in the pool: open (lazy files are decoded here, not on the caller's thread) and hash one image."""
    pil = to_pil(image, index)
    try:
        pil.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidRequest(f"image {index} is not a decodable image: {e}") from None
    return pil, image_hash(pil)


@dataclass
class _Pending:
    """One image waiting for the encoder; ``future`` is shared by every request that needs it."""

    key: str
    pixels: torch.Tensor
    future: Future


class VisionRunner:
    """Invariants: ``_cached_bytes`` is the size of ``_cache``'s tensors and never exceeds ``cache_bytes``; a hash is
    in at most one of ``_cache`` and ``_inflight``; only the holder of ``_encode_lock`` calls the encoder."""

    def __init__(
        self,
        model: VisionModel,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_batch: int = DEFAULT_MAX_BATCH,
        gather_s: float = DEFAULT_GATHER_S,
        preprocess_workers: int = DEFAULT_PREPROCESS_WORKERS,
        encode_fn: EncodeFn | None = None,
    ):
        self.model = model
        # The backend slot: the TensorRT issue replaces eager ``model.encode`` by an engine of the same signature.
        self.encode_fn: EncodeFn = encode_fn or model.encode
        self.cache_bytes = cache_bytes
        self.max_batch = max(1, max_batch)
        self.gather_s = gather_s
        self._pool = ThreadPoolExecutor(max(1, preprocess_workers), thread_name_prefix="rtp-mm-vision")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._state = threading.Lock()  # guards the cache, the queue, the in-flight map and the counters
        self._encode_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._inflight: dict[str, Future] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.images_encoded = 0
        self.encode_batches = 0
        self.encode_seconds = 0.0

    def prepare(self, prompt_ids: list[int], images: list[Any]) -> PreparedPrompt:
        loaded = list(self._pool.map(_load_and_hash, images, range(len(images))))
        pil = [p for p, _ in loaded]
        hashes = [h for _, h in loaded]
        return self.model.expand(list(prompt_ids), self.embeddings(pil, hashes), hashes)

    def embeddings(self, images: list[Any], hashes: list[str]) -> list[torch.Tensor]:
        """Embedding rows per image. A cached image is not encoded; an image another request is already waiting
        for is encoded once for both; the rest is preprocessed in the pool and queued for the next batch."""
        found: dict[str, torch.Tensor] = {}
        waiting: dict[str, Future] = {}
        to_preprocess: dict[str, Any] = {}
        with self._state:
            for h, image in zip(hashes, images, strict=True):
                if h in found or h in waiting or h in to_preprocess:
                    self.cache_hits += 1  # a repeat inside one request reuses the same rows
                elif h in self._cache:
                    self._cache.move_to_end(h)
                    found[h] = self._cache[h]
                    self.cache_hits += 1
                elif h in self._inflight:
                    waiting[h] = self._inflight[h]
                    self.cache_hits += 1
                else:
                    to_preprocess[h] = image
                    self.cache_misses += 1
                    future: Future = Future()
                    self._inflight[h] = future
                    waiting[h] = future
        if to_preprocess:
            try:
                pixels = list(self._pool.map(self.model.preprocess, to_preprocess.values()))
            except BaseException as e:
                self._abandon(list(to_preprocess), e)
                raise
            with self._state:
                self._queue += [_Pending(h, p, waiting[h]) for h, p in zip(to_preprocess, pixels, strict=True)]
        self._drive(list(waiting.values()))
        for h, future in waiting.items():
            found[h] = future.result()
        return [found[h] for h in hashes]

    def _abandon(self, keys: list[str], error: BaseException) -> None:
        """Preprocessing failed: release the in-flight entries so other requests waiting on them fail too."""
        with self._state:
            for h in keys:
                future = self._inflight.pop(h, None)
                if future is not None and not future.done():
                    future.set_exception(error)

    def _drive(self, futures: list[Future]) -> None:
        """Encode queued batches until every future of this caller is resolved (by this thread or another)."""
        while True:
            pending = [f for f in futures if not f.done()]
            if not pending:
                return
            with self._encode_lock:
                if all(f.done() for f in pending):
                    continue
                if self.gather_s > 0:
                    time.sleep(self.gather_s)
                with self._state:
                    batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                if batch:
                    self._encode(batch)
                    continue
            # Nothing queued: an image this caller needs is still being preprocessed by another request.
            wait(pending, timeout=0.005, return_when=FIRST_COMPLETED)

    def _encode(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            encoded = self.encode_fn([p.pixels for p in batch])
            if len(encoded) != len(batch):
                raise RuntimeError(f"the vision encoder returned {len(encoded)} outputs for {len(batch)} images")
        except BaseException as e:
            with self._state:
                for p in batch:
                    self._inflight.pop(p.key, None)
                    p.future.set_exception(e)
            return
        with self._state:
            self.encode_seconds += time.perf_counter() - start
            self.encode_batches += 1
            self.images_encoded += len(batch)
            for p, rows in zip(batch, encoded, strict=True):
                self._inflight.pop(p.key, None)
                self._insert(p.key, rows)
                p.future.set_result(rows)

    def _insert(self, key: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.cache_bytes:
            return
        self._cache[key] = rows
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def stats(self) -> dict[str, Any]:
        with self._state:
            return {
                "vision_cache_hits": self.cache_hits,
                "vision_cache_misses": self.cache_misses,
                "vision_images_encoded": self.images_encoded,
                "vision_encode_batches": self.encode_batches,
                "vision_encode_seconds": self.encode_seconds,
                "vision_cache_bytes": self._cached_bytes,
                "vision_cache_entries": len(self._cache),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
