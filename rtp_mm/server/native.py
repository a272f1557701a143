"""Handlers of RTP-LLM's native routes (behaviour reference, section 1.1): ``POST /`` (JSON or SSE), ``GET /``, the
health probes, ``GET /worker_status`` and ``POST /tokenizer/encode``. Parsing and shapes live in ``protocol``.

Every generation request holds one slot of the in-flight counter per sequence from before its images are loaded until
its response (or stream) is finished, failed or cancelled; a request beyond ``CONCURRENCY_LIMIT`` gets 409/513.

Body reading, images and concurrency slots come from ``intake``, shared with the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from aiohttp import web

from rtp_mm.api import EngineRequest
from rtp_mm.api.engine_client import EngineClient
from rtp_mm.errors import RtpMmError
from rtp_mm.server.errors import describe_error
from rtp_mm.server.generation import RequestGroup
from rtp_mm.server.intake import load_images, read_body, sequence_slots
from rtp_mm.server.protocol import (
    STREAM_DONE,
    NativeRequest,
    SequenceView,
    dumps,
    native_image_groups,
    native_image_refs,
    parse_native_request,
    response_body,
    sequence_view,
    stream_event,
    tokenizer_encode_body,
)
from rtp_mm.server.state import ENGINE_KEY, LIMITER_KEY, METRICS_KEY

logger = logging.getLogger(__name__)


def _make_requests(engine: EngineClient, native: NativeRequest, images: list[Any]) -> list[EngineRequest]:
    """One engine request per (prompt, sequence) pair, prompt-major; the engine tokenizes and validates them (the
    encoder cache serves a prompt's images to all its sequences)."""
    groups = native_image_groups(native, images) if images else [[] for _ in native.prompts]
    return [
        engine.request(prompt, config, group)
        for index, (prompt, group) in enumerate(zip(native.prompts, groups, strict=True))
        for config in native.prompt_configs(index)
    ]


def _empty_views(native: NativeRequest) -> list[list[SequenceView]]:
    return [[SequenceView() for _ in range(native.num_sequences)] for _ in native.prompts]


async def handle_generate(request: web.Request) -> web.StreamResponse:
    app = request.app
    body, uploads = await read_body(request)
    native = parse_native_request(body)
    with sequence_slots(request, native.total_sequences):
        images = await load_images(request, native_image_refs(native), uploads)
        requests = _make_requests(app[ENGINE_KEY], native, images)
        async with RequestGroup(app[ENGINE_KEY], requests, app[METRICS_KEY]) as group:
            await group.accepted()  # a rejected prompt is an HTTP error, before any byte of a stream
            if native.stream:
                return await _stream(request, native, group)
            outs = await group.finals()
        views = _empty_views(native)
        for index, out in enumerate(outs):
            i, j = divmod(index, native.num_sequences)
            views[i][j] = sequence_view(out.text, out)
        return web.json_response(response_body(native, views), dumps=dumps)


async def _stream(request: web.Request, native: NativeRequest, group: RequestGroup) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    views = _empty_views(native)
    incremental = native.config.return_incremental
    try:
        async with aclosing(group.outputs()) as outputs:
            async for index, out in outputs:
                if incremental:  # an event carries only what is new since the previous event
                    for view in (v for seqs in views for v in seqs):
                        view.text = ""
                i, j = divmod(index, native.num_sequences)
                views[i][j] = sequence_view(out.delta_text if incremental else out.text, out)
                await resp.write(stream_event(response_body(native, views)))
        await resp.write(STREAM_DONE)
    except ConnectionResetError:
        logger.info("client %s closed its stream: its requests are cancelled (499)", request.remote)
    except RtpMmError as e:
        await _write_error_event(resp, e)
    except Exception as e:
        logger.exception("stream failed with an unexpected error")
        await _write_error_event(resp, e)
    return resp


async def _write_error_event(resp: web.StreamResponse, error: Exception) -> None:
    """Headers are sent: the error becomes one more event (RTP-LLM sends no ``[done]`` after it)."""
    try:
        await resp.write(stream_event(describe_error(error)[1]))
    except ConnectionResetError:
        pass


async def handle_home(request: web.Request) -> web.Response:
    return web.json_response({"status": "home"})


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response("ok")


async def handle_worker_status(request: web.Request) -> web.Response:
    # stats() waits for the engine thread to finish its current step.
    stats = await asyncio.to_thread(request.app[ENGINE_KEY].stats)
    block_size = stats["block_size"]
    return web.json_response(
        {
            "available_concurrency": request.app[LIMITER_KEY].available,
            "available_kv_cache": stats["free_blocks"] * block_size,  # tokens, as RTP-LLM
            "total_kv_cache": stats["num_blocks"] * block_size,  # rtp-mm reserves no block (RTP-LLM: blocks - 1)
            "alive": True,
            "step_latency_ms": stats["last_step_ms"],
            "iterate_count": stats["step_count"],
        }
    )


def _encode_with_tokens(engine: EngineClient, prompt: str) -> dict:
    token_ids = engine.tokenize(prompt)
    # As RTP-LLM: each id decoded on its own.
    return {"token_ids": token_ids, "tokens": [engine.token_text(t) for t in token_ids], "error": ""}


async def handle_tokenizer_encode(request: web.Request) -> web.Response:
    body, _ = await read_body(request)
    prompt = tokenizer_encode_body(body)
    body = await asyncio.to_thread(_encode_with_tokens, request.app[ENGINE_KEY], prompt)
    return web.json_response(body, dumps=dumps)


async def handle_metrics(request: web.Request) -> web.Response:
    stats = await asyncio.to_thread(request.app[ENGINE_KEY].stats)
    text = request.app[METRICS_KEY].render(stats, request.app[LIMITER_KEY].in_flight)
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
