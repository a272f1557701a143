"""Handlers of RTP-LLM's native routes (behaviour reference, section 1.1): ``POST /`` (JSON or SSE), ``GET /``, the
health probes, ``GET /worker_status`` and ``POST /tokenizer/encode``. Parsing and shapes live in ``protocol``.

Every generation request holds one slot of the in-flight counter from before its images are loaded until its
response (or stream) is finished, failed or cancelled; a request beyond ``CONCURRENCY_LIMIT`` gets 409/513.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from aiohttp import web

from rtp_mm.api import LLM
from rtp_mm.errors import RtpMmError
from rtp_mm.llm.engine.request import Request
from rtp_mm.server.body import read_body
from rtp_mm.server.errors import describe_error
from rtp_mm.server.generation import engine_outputs, final_outputs
from rtp_mm.server.protocol import (
    STREAM_DONE,
    NativeRequest,
    SequenceView,
    check_images,
    dumps,
    native_image_groups,
    native_image_refs,
    parse_json_body,
    parse_native_request,
    response_body,
    stream_event,
    tokenizer_encode_body,
)
from rtp_mm.server.state import IMAGES_KEY, LIMITER_KEY, LLM_KEY, METRICS_KEY, SETTINGS_KEY

logger = logging.getLogger(__name__)


async def read_request_body(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    server = request.app[SETTINGS_KEY].server
    return await read_body(request, server.max_body_mb * 2**20, server.image_max_mb * 2**20)


async def load_images(request: web.Request, refs: list[Any], uploads: dict[str, bytes]) -> list[Any]:
    """Decode every image (limits checked), then refuse them if the model cannot take images."""
    if not refs and not uploads:
        return []
    images = await request.app[IMAGES_KEY].load(refs, uploads)
    llm = request.app[LLM_KEY]
    check_images(len(images), llm.model_type, llm.vision is not None)
    return images


def _make_requests(llm: LLM, native: NativeRequest, images: list[Any]) -> list[Request]:
    """Tokenize, expand the images and validate every (prompt, sequence) pair, prompt-major; raises InvalidRequest
    subclasses. Runs in a worker thread: the vision encoder runs here (its cache serves the repeated sequences)."""
    configs = native.sequence_configs()
    groups = native_image_groups(native, images) if images else [None] * len(native.prompts)
    return [
        llm.make_request(prompt, config, group)
        for prompt, group in zip(native.prompts, groups, strict=True)
        for config in configs
    ]


def _empty_views(native: NativeRequest) -> list[list[SequenceView]]:
    return [[SequenceView() for _ in range(native.num_sequences)] for _ in native.prompts]


async def handle_generate(request: web.Request) -> web.StreamResponse:
    app = request.app
    body, uploads = await read_request_body(request)
    native = parse_native_request(body)
    with app[LIMITER_KEY].slot():
        images = await load_images(request, native_image_refs(native), uploads)
        # Tokenizing a long prompt takes milliseconds, encoding images far longer: off the event loop.
        requests = await asyncio.to_thread(_make_requests, app[LLM_KEY], native, images)
        if native.stream:
            return await _stream(request, native, requests)
        outs = await final_outputs(app[LLM_KEY], requests, app[METRICS_KEY])
        views = _empty_views(native)
        for index, out in enumerate(outs):
            i, j = divmod(index, native.num_sequences)
            views[i][j] = SequenceView(out.text, True, out.aux_info)
        return web.json_response(response_body(native, views), dumps=dumps)


async def _stream(request: web.Request, native: NativeRequest, requests: list[Request]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    views = _empty_views(native)
    incremental = native.config.return_incremental
    try:
        outputs = engine_outputs(request.app[LLM_KEY], requests, request.app[METRICS_KEY])
        async with aclosing(outputs):
            async for index, out in outputs:
                if incremental:  # an event carries only what is new since the previous event
                    for view in (v for seqs in views for v in seqs):
                        view.text = ""
                i, j = divmod(index, native.num_sequences)
                views[i][j] = SequenceView(out.delta_text if incremental else out.text, out.finished, out.aux_info)
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
    stats = await asyncio.to_thread(request.app[LLM_KEY].stats)
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


def _encode_with_tokens(llm: LLM, prompt: str) -> dict:
    token_ids = llm.encode(prompt)
    # As RTP-LLM: each id decoded on its own.
    return {"token_ids": token_ids, "tokens": [llm.tokenizer.decode([t]) for t in token_ids], "error": ""}


async def handle_tokenizer_encode(request: web.Request) -> web.Response:
    prompt = tokenizer_encode_body(parse_json_body(await request.read()))
    body = await asyncio.to_thread(_encode_with_tokens, request.app[LLM_KEY], prompt)
    return web.json_response(body, dumps=dumps)


async def handle_metrics(request: web.Request) -> web.Response:
    stats = await asyncio.to_thread(request.app[LLM_KEY].stats)
    text = request.app[METRICS_KEY].render(stats, request.app[LIMITER_KEY].in_flight)
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
