"""Running the engine requests of one HTTP request: a fan-in of their output streams, with latency metrics.

Closing the iterator early (error, client disconnect, handler cancellation, a finished stream) stops every
per-request stream, which aborts the unfinished requests in the engine and frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from rtp_mm.api import LLM
from rtp_mm.llm.engine.engine import RequestOutput
from rtp_mm.llm.engine.request import Request
from rtp_mm.server.metrics import ServerMetrics


async def engine_outputs(
    llm: LLM, requests: list[Request], metrics: ServerMetrics | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index in ``requests``, output) as the engine produces them, until every request has finished.

    The first failing request raises here.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()
    start = time.monotonic()
    first_token: dict[int, float] = {}

    async def pump(index: int, req: Request) -> None:
        try:
            async with aclosing(llm.stream_request(req)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out, None))
        except Exception as e:  # handed to the consumer
            queue.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, req)) for i, req in enumerate(requests)]
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
                if metrics is not None:
                    first = first_token.get(index)
                    metrics.observe_finished(
                        out.aux_info["input_len"],
                        out.aux_info["output_len"],
                        None if first is None else first - start,
                        0.0 if first is None else now - first,
                    )
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(llm: LLM, requests: list[Request], metrics: ServerMetrics | None = None) -> list[RequestOutput]:
    """The finished output of every request, in request order."""
    finals: list[RequestOutput | None] = [None] * len(requests)
    async with aclosing(engine_outputs(llm, requests, metrics)) as outputs:
        async for index, out in outputs:
            if out.finished:
                finals[index] = out
    assert all(o is not None for o in finals)
    return finals  # type: ignore[return-value]
