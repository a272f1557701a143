"""The engine requests of one HTTP request, run as a group: submitted together, admitted together, their output
streams fanned in, with latency metrics.

``accepted()`` waits for every request's admission and raises the first rejection (a bad prompt, a prompt too long,
a placeholder mismatch), so a handler answers it with an HTTP error before it sends any byte. Leaving the group
(``async with``) cancels every unfinished request, which frees its KV blocks at once: on an error, a client that
disconnects, a cancelled handler, or a finished stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from rtp_mm.api import EngineRequest, RequestOutput
from rtp_mm.api.engine_client import EngineClient, RequestStream
from rtp_mm.server.metrics import ServerMetrics


class RequestGroup:
    """Invariant: after ``__aexit__`` no request of the group is left running in the engine."""

    def __init__(self, engine: EngineClient, requests: list[EngineRequest], metrics: ServerMetrics | None = None):
        self._streams: list[RequestStream] = [engine.stream(req) for req in requests]
        self._metrics = metrics
        self._start = time.monotonic()

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for stream in self._streams:
            await stream.aclose()

    async def accepted(self) -> None:
        """Every request admitted; else the first rejection is raised (the group's exit cancels the rest)."""
        results = await asyncio.gather(*(s.accepted() for s in self._streams), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index in the group, output) as the engine produces them, until every request has finished. The first
        failing request raises here."""
        await self.accepted()
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        first_token: dict[int, float] = {}

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out, None))
            except Exception as e:  # handed to the consumer
                queue.put_nowait((index, None, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, out, error = await queue.get()
                if error is not None:
                    raise error
                assert out is not None
                now = time.monotonic()
                if out.num_new_tokens and index not in first_token:
                    first_token[index] = now
                if out.finished:
                    remaining -= 1
                    self._observe(out, first_token.get(index), now)
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def finals(self) -> list[RequestOutput]:
        """The finished output of every request, in group order."""
        finals: list[RequestOutput | None] = [None] * len(self._streams)
        async for index, out in self.outputs():
            if out.finished:
                finals[index] = out
        assert all(o is not None for o in finals)
        return finals  # type: ignore[return-value]

    def _observe(self, out: RequestOutput, first: float | None, now: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_finished(
                out.aux_info["input_len"],
                out.aux_info["output_len"],
                None if first is None else first - self._start,
                0.0 if first is None else now - first,
            )
