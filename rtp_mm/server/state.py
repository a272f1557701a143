"""The app's typed state (``web.AppKey``s) and the concurrency limiter; imported by every handler module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from rtp_mm.api.engine_client import EngineClient
from rtp_mm.config import Settings
from rtp_mm.errors import CapacityExceeded, InvalidRequest
from rtp_mm.server.images import ImageIntake
from rtp_mm.server.metrics import ServerMetrics


class ConcurrencyLimiter:
    """HTTP generation requests in flight (RTP-LLM's ConcurrencyController without its blocking mode).

    Invariant: ``0 <= in_flight <= limit``; ``in_flight`` counts sequences (rows of the engine's batch). Only
    touched from the event loop thread, so it needs no lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @property
    def available(self) -> int:
        return self.limit - self.in_flight

    @contextmanager
    def slot(self, weight: int = 1) -> Iterator[None]:
        """Hold ``weight`` slots: a request counts once per sequence it runs in the engine's batch."""
        if weight > self.limit:
            raise InvalidRequest(
                f"the request asks for {weight} sequences (prompts x samples); CONCURRENCY_LIMIT={self.limit} allows "
                f"at most {self.limit} in flight"
            )
        if self.in_flight + weight > self.limit:
            raise CapacityExceeded(f"Concurrency limit {self.limit} reached")
        self.in_flight += weight
        try:
            yield
        finally:
            self.in_flight -= weight


ENGINE_KEY = web.AppKey("engine", EngineClient)
SETTINGS_KEY = web.AppKey("settings", Settings)
LIMITER_KEY = web.AppKey("limiter", ConcurrencyLimiter)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
# Set by the cleanup context (it owns the decoding pool and the fetch session behind it).
IMAGES_KEY = web.AppKey("images", ImageIntake)
MODEL_NAME_KEY = web.AppKey("model_name", str)
