"""The aiohttp application: RTP-LLM's native routes and OpenAI's routes over one ``EngineClient``.

    app = create_app(None, settings)           # the cleanup context loads the engine and owns it
    app = create_app(client, settings)         # tests, embedding in another aiohttp program: stays the caller's
    run_server(settings)                       # ``python -m rtp_mm.start_server``
    with BackgroundServer(app) as url: ...     # serve on a free loopback port from a thread (tests, load script)

State lives under typed ``web.AppKey``s (``state``); one cleanup context owns the engine (when the app loaded it),
the image-decoding thread pool and the image-fetch session. Handlers are thin (``native``, ``openai_routes``); body
reading, images and concurrency slots are ``intake``; the typed wire models (pydantic) and response shapes live in
``protocol`` / ``openai_protocol`` and describe themselves at ``/openapi.json`` (``openapi``); the mapping of errors
to statuses is ``errors``.

Middlewares, outermost first: with ``CORS_ALLOW_ORIGINS`` set, CORS (``cors``: answers preflights before auth; its
``on_response_prepare`` hook labels every other response, streams and errors included), metrics (requests by route
and status), errors (typed errors to JSON bodies), auth
(with ``API_KEY`` set, every route but the health probes, ``/openapi.json`` and the playground page needs
``Authorization: Bearer <API_KEY>``), and innermost,
appended by ``shutdown.install``, the count of requests in flight that shutdown waits for. With
``handler_cancellation`` on (``run_server``, ``BackgroundServer``), a client that goes away cancels its handler and
so its engine requests, whose KV blocks are freed at once. Shutdown (SIGINT/SIGTERM) stops accepting connections,
lets in-flight requests finish for up to ``SHUTDOWN_TIMEOUT_S``, fails what still runs (streams end with their error
event), then stops the engine (``shutdown``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rtp_mm.api.engine_client import EngineClient
from rtp_mm.config import Settings
from rtp_mm.errors import ConfigError, EngineDead
from rtp_mm.server import adapters, cors, native, openai_routes, openapi, playground, shutdown
from rtp_mm.server.errors import Unauthorized, error_middleware
from rtp_mm.server.images import ImageIntake, ImageLimits, make_fetch_connector
from rtp_mm.server.metrics import ServerMetrics
from rtp_mm.server.state import (
    ENGINE_KEY,
    IMAGES_KEY,
    LIMITER_KEY,
    METRICS_KEY,
    MODEL_NAME_KEY,
    SETTINGS_KEY,
    ConcurrencyLimiter,
)

logger = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/status", "/health_check", "/GraphService/cm2_status", "/SearchService/cm2_status")
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i"'
IMAGE_DECODE_THREADS = 4


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS_KEY].observe_response(route, status)


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 7235: the scheme is case-insensitive and any run
    of spaces or tabs separates it from the token)."""
    parts = header.strip(" \t").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip(" \t")


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    api_key = request.app[SETTINGS_KEY].server.api_key
    public = request.path in HEALTH_PATHS or request.path == openapi.PATH or playground.is_public(request.path)
    if api_key and not public:
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is None or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")
    return await handler(request)


async def handle_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.openapi_document())


def served_model_name(configured: str, ckpt_path: str, fallback: str) -> str:
    """SERVED_MODEL_NAME, else the checkpoint folder's name or a GGUF file's stem, else ``fallback``: never a path,
    since ``/v1/models`` may be public and every OpenAI response echoes it."""
    if configured:
        return configured
    # abspath, not resolve: "." still names its folder, and symlinks (Hugging Face cache snapshots) are not followed.
    path = Path(os.path.abspath(ckpt_path)) if ckpt_path else None
    if path is None or not path.name:
        return fallback
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _resources(given: EngineClient | None, owns_engine: bool, on_fatal: Any = None) -> Any:
    """The one cleanup context: the engine (loaded here when ``given`` is None), the image-decoding pool and the
    image-fetch session, all released on cleanup (after in-flight requests finished)."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS_KEY]
        owned = owns_engine or given is None
        engine = given or await asyncio.to_thread(EngineClient, settings.model, settings.engine, on_fatal=on_fatal)
        app[ENGINE_KEY] = engine
        info = engine.info
        app[MODEL_NAME_KEY] = served_model_name(
            settings.server.served_model_name, info.model_config.ckpt_path, info.model_type.name
        )
        limits = ImageLimits.from_server_config(settings.server)
        pool = ThreadPoolExecutor(IMAGE_DECODE_THREADS, thread_name_prefix="rtp-mm-image")
        session = None
        if limits.url_hosts:
            connector = make_fetch_connector()
            session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": "rtp-mm"})
        # A vision model's images are hashed and preprocessed in the same pool job that decodes them.
        prepare = engine.prepare_image if engine.vision is not None else None
        app[IMAGES_KEY] = ImageIntake(limits, pool, session, prepare)
        try:
            yield
        finally:
            if session is not None:
                await session.close()
            pool.shutdown(wait=False, cancel_futures=True)
            if owned:
                await asyncio.to_thread(engine.shutdown)

    return resources


def create_app(
    engine: EngineClient | None, settings: Settings, *, owns_engine: bool = False, on_fatal: Any = None
) -> web.Application:
    """The aiohttp app serving ``engine`` (None: loaded from ``settings`` at start-up and owned by the app).

    With ``owns_engine`` a given engine is also shut down on cleanup; ``on_fatal`` goes to the engine it loads (see
    EngineLoop)."""
    server = settings.server
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
        client_max_size=server.max_body_mb * 2**20,
    )
    cors.install(app, server.cors_allow_origins)
    app[SETTINGS_KEY] = settings
    app[LIMITER_KEY] = ConcurrencyLimiter(settings.engine.concurrency_limit)
    app[METRICS_KEY] = ServerMetrics()
    app.cleanup_ctx.append(_resources(engine, owns_engine, on_fatal))
    shutdown.install(app)
    router = app.router
    router.add_post("/", native.handle_generate)
    router.add_get("/", native.handle_home)
    for path in HEALTH_PATHS:
        router.add_route("*", path, native.handle_health)
    router.add_get("/worker_status", native.handle_worker_status)
    router.add_post("/tokenizer/encode", native.handle_tokenizer_encode)
    router.add_post("/update", adapters.handle_update)  # LoRA adapters at run time (RTP-LLM's VersionInfo body)
    router.add_get("/metrics", native.handle_metrics)
    router.add_get("/v1/models", openai_routes.handle_models)
    router.add_post("/v1/chat/completions", openai_routes.handle_chat_completions)
    router.add_post("/chat/completions", openai_routes.handle_chat_completions)  # RTP-LLM's alias
    router.add_post("/v1/completions", openai_routes.handle_completions)
    router.add_post("/v1/embeddings", openai_routes.handle_embeddings)
    router.add_get(openapi.PATH, handle_openapi)
    playground.add_routes(router)
    return app


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` (as aiohttp's own site would bind them), not listening yet.

    Made before the model loads, so a busy START_PORT fails start-up within a second instead of after the load, and
    handed to aiohttp so no other process can take the port in between. They listen once the server starts: until
    then a client is refused at once rather than left waiting in the backlog while the model loads."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # asyncio's defaults for loop.create_server, which aiohttp used to bind with.
            if os.name == "posix" and sys.platform != "cygwin":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"START_PORT={port}: cannot listen on {host}:{port} ({e})") from e
    return sockets


def run_server(settings: Settings) -> None:
    """Take START_PORT, load the model, then serve until SIGINT/SIGTERM (in-flight requests finish, then the engine
    stops)."""
    host = settings.server.host
    sockets = bind_sockets(host, settings.server.start_port)
    port = sockets[0].getsockname()[1]  # START_PORT=0 binds a free port: announce the one taken
    fatal: list[BaseException] = []

    def stop_serving(error: BaseException) -> None:
        # On the engine thread, after every request got its error: the usual graceful shutdown, then exit status 1.
        fatal.append(error)
        os.kill(os.getpid(), signal.SIGTERM)

    app = create_app(None, settings, on_fatal=stop_serving)

    def announce(_aiohttp_banner: str) -> None:
        # WARNING so that the one start-up line shows under the default LOG_LEVEL=WARNING.
        url = f"http://{host}:{port}"
        name = app[ENGINE_KEY].info.model_type.name
        logger.warning("rtp-mm serving %s on %s (playground: %s%s)", name, url, url, playground.PATH)

    try:
        web.run_app(
            app,
            sock=sockets,
            print=announce,
            handler_cancellation=True,
            shutdown_timeout=shutdown.HANDLER_GRACE_S,  # SHUTDOWN_TIMEOUT_S is waited in shutdown.drain
            access_log_format=ACCESS_LOG_FORMAT,
            keepalive_timeout=settings.server.client_timeout_s,  # idle connections close after CLIENT_TIMEOUT_S
        )
    finally:
        for sock in sockets:  # already closed when the server ran; not when start-up failed
            sock.close()
    if fatal:
        raise EngineDead(f"the engine stopped: {fatal[0]}")


class BackgroundServer:
    """Serves ``app`` on its own event-loop thread, as ``run_server`` does (handler cancellation, access log,
    graceful shutdown). ``start()`` returns the base URL; ``stop()`` shuts down gracefully, within the
    ``shutdown_timeout_s`` of the app's settings (``SHUTDOWN_TIMEOUT_S``)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="rtp-mm-server", daemon=True)

    def start(self, timeout: float = 120.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error
        return self.url

    def stop(self, timeout: float = 120.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log_format=ACCESS_LOG_FORMAT,
            shutdown_timeout=shutdown.HANDLER_GRACE_S,  # SHUTDOWN_TIMEOUT_S is waited in shutdown.drain
            keepalive_timeout=self.app[SETTINGS_KEY].server.client_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
