"""The aiohttp application: RTP-LLM's native routes over one ``LLM``.

    app = create_app(llm, settings)            # tests, embedding in another aiohttp program
    run_server(settings)                       # ``python -m rtp_mm.start_server``

Routes (behaviour reference, section 1.1): ``POST /`` (native generation, JSON or SSE), ``GET /``, health probes,
``GET /worker_status`` and ``POST /tokenizer/encode``. Handlers are thin: parsing and response shapes live in
``protocol``, the mapping of errors to statuses in ``errors``.

Every generation request holds one slot of the in-flight counter from before generation until its response (or
stream) is finished, failed or cancelled; a request beyond ``CONCURRENCY_LIMIT`` gets 409/513. A client that
disconnects cancels its engine requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager

from aiohttp import web

from rtp_mm.api import LLM
from rtp_mm.config import Settings
from rtp_mm.errors import CapacityExceeded, ConfigError, RtpMmError
from rtp_mm.llm.engine.engine import RequestOutput
from rtp_mm.llm.engine.request import Request
from rtp_mm.server.errors import describe_error, error_middleware
from rtp_mm.server.protocol import (
    STREAM_DONE,
    NativeRequest,
    SequenceView,
    check_images,
    dumps,
    parse_json_body,
    parse_native_request,
    response_body,
    stream_event,
    tokenizer_encode_body,
)

logger = logging.getLogger(__name__)

# Prompts of long-context models are large; images (a later route) raise this further.
MAX_BODY_BYTES = 16 * 2**20
HEALTH_PATHS = ("/health", "/status", "/health_check", "/GraphService/cm2_status", "/SearchService/cm2_status")


class ConcurrencyLimiter:
    """HTTP generation requests in flight (RTP-LLM's ConcurrencyController without its blocking mode).

    Invariant: ``0 <= in_flight <= limit``. Only touched from the event loop thread, so it needs no lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @property
    def available(self) -> int:
        return self.limit - self.in_flight

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise CapacityExceeded(f"Concurrency limit {self.limit} reached")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


LLM_KEY = web.AppKey("llm", LLM)
SETTINGS_KEY = web.AppKey("settings", Settings)
LIMITER_KEY = web.AppKey("limiter", ConcurrencyLimiter)


# ---- generation -----------------------------------------------------------------------------------------------
async def _outputs(llm: LLM, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index in ``requests``, output) as the engine produces them, until every request has finished.

    The first failing request raises here. Closing this iterator early (error, disconnect, cancellation) stops the
    per-request streams, which aborts the unfinished requests in the engine.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()

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
            yield index, out
            if out.finished:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _empty_views(native: NativeRequest) -> list[list[SequenceView]]:
    return [[SequenceView() for _ in range(native.num_sequences)] for _ in native.prompts]


async def _complete(llm: LLM, native: NativeRequest, requests: list[Request]) -> web.Response:
    views = _empty_views(native)
    async with aclosing(_outputs(llm, requests)) as outputs:
        async for index, out in outputs:
            if out.finished:
                i, j = divmod(index, native.num_sequences)
                views[i][j] = SequenceView(out.text, True, out.aux_info)
    return web.json_response(response_body(native, views), dumps=dumps)


async def _stream(
    request: web.Request, llm: LLM, native: NativeRequest, requests: list[Request]
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    views = _empty_views(native)
    incremental = native.config.return_incremental
    try:
        async with aclosing(_outputs(llm, requests)) as outputs:
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


def _make_requests(llm: LLM, native: NativeRequest) -> list[Request]:
    """Tokenize and validate every (prompt, sequence) pair, prompt-major; raises InvalidRequest subclasses."""
    configs = native.sequence_configs()
    return [llm.make_request(prompt, config) for prompt in native.prompts for config in configs]


# ---- handlers -------------------------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict:
    return parse_json_body(await request.read())


async def handle_generate(request: web.Request) -> web.StreamResponse:
    llm = request.app[LLM_KEY]
    native = parse_native_request(await _json_body(request))
    check_images(native, llm.model_type)
    # Tokenizing a long prompt takes milliseconds: off the event loop.
    requests = await asyncio.to_thread(_make_requests, llm, native)
    with request.app[LIMITER_KEY].slot():
        if native.stream:
            return await _stream(request, llm, native, requests)
        return await _complete(llm, native, requests)


async def handle_home(request: web.Request) -> web.Response:
    return web.json_response({"status": "home"})


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response("ok")


async def handle_worker_status(request: web.Request) -> web.Response:
    # stats() waits for the engine thread to finish its current step.
    stats = await asyncio.to_thread(request.app[LLM_KEY].stats)
    block_size = stats["block_size"]
    return web.json_response({
        "available_concurrency": request.app[LIMITER_KEY].available,
        "available_kv_cache": stats["free_blocks"] * block_size,  # tokens, as RTP-LLM
        "total_kv_cache": stats["num_blocks"] * block_size,  # rtp-mm reserves no block (RTP-LLM: blocks - 1)
        "alive": True,
        "step_latency_ms": stats["last_step_ms"],
        "iterate_count": stats["step_count"],
    })


def _encode_with_tokens(llm: LLM, prompt: str) -> dict:
    token_ids = llm.encode(prompt)
    # As RTP-LLM: each id decoded on its own.
    return {"token_ids": token_ids, "tokens": [llm.tokenizer.decode([t]) for t in token_ids], "error": ""}


async def handle_tokenizer_encode(request: web.Request) -> web.Response:
    prompt = tokenizer_encode_body(await _json_body(request))
    body = await asyncio.to_thread(_encode_with_tokens, request.app[LLM_KEY], prompt)
    return web.json_response(body, dumps=dumps)


# ---- application ----------------------------------------------------------------------------------------------
async def _own_engine(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context of an app that owns its LLM: the engine thread stops with the app."""
    yield
    await asyncio.to_thread(app[LLM_KEY].shutdown)


def create_app(llm: LLM, settings: Settings, *, owns_llm: bool = False) -> web.Application:
    """The aiohttp app serving ``llm``. With ``owns_llm`` the app shuts the engine down on cleanup."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[LLM_KEY] = llm
    app[SETTINGS_KEY] = settings
    app[LIMITER_KEY] = ConcurrencyLimiter(settings.engine.concurrency_limit)
    if owns_llm:
        app.cleanup_ctx.append(_own_engine)
    app.router.add_post("/", handle_generate)
    app.router.add_get("/", handle_home)
    for path in HEALTH_PATHS:
        app.router.add_route("*", path, handle_health)
    app.router.add_get("/worker_status", handle_worker_status)
    app.router.add_post("/tokenizer/encode", handle_tokenizer_encode)
    return app


def run_server(settings: Settings) -> None:
    """Load the model, then serve until SIGINT/SIGTERM (the engine is shut down on the way out)."""
    llm = LLM(settings.model, settings.engine)
    app = create_app(llm, settings, owns_llm=True)
    host, port = settings.server.host, settings.server.start_port

    def announce(_aiohttp_banner: str) -> None:
        # WARNING so that the one start-up line shows under the default LOG_LEVEL=WARNING.
        logger.warning("rtp-mm serving %s on http://%s:%d", llm.model_type.name, host, port)

    try:
        # handler_cancellation: a client that goes away mid-request cancels its handler, hence its engine requests.
        web.run_app(app, host=host, port=port, print=announce, handler_cancellation=True)
    except OSError as e:
        llm.shutdown()
        raise ConfigError(f"START_PORT={port}: cannot listen on {host}:{port} ({e})") from e
