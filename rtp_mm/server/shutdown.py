"""Graceful shutdown that keeps ``SHUTDOWN_TIMEOUT_S``.

On SIGTERM/SIGINT (``run_server``) or ``BackgroundServer.stop()``, aiohttp stops accepting connections and closes the
idle ones, then runs the app's ``on_shutdown`` hooks: ``drain`` waits there for up to ``SHUTDOWN_TIMEOUT_S`` until no
request is left in a handler. When the timeout runs out, every engine stream of the server fails with a 503
``EngineDead("server shutting down: SHUTDOWN_TIMEOUT_S=... ran out")`` and its engine request is cancelled: a stream
ends with its error event (native ``data:{"error_code":514,...}``; OpenAI ``data: {"error": {...}}`` then
``data: [DONE]``), a request not streaming (or not admitted yet) gets a 503 response. Then the cleanup context
stops the engine and the process exits, about a second after the timeout (engine stop, interpreter exit); a handler
that ignores the failure is cut ``FAIL_GRACE_S + 2 * HANDLER_GRACE_S`` after the timeout.

Why not aiohttp's ``shutdown_timeout`` alone: aiohttp 3.14 (``RequestHandler.shutdown``) waits that long for a
handler, then "cancels" it by failing only its request *body* (a streaming handler never reads it again), waits the
whole timeout a second time, and only then cancels the handler task. A stream was cut without an error event after
twice the timeout, so its client could not tell a cut from an answer, and the process outlived the promise. Here
aiohttp's own timeout is just ``HANDLER_GRACE_S``, for a handler still running after ``drain`` (one that was not
reading the engine, or is stuck writing to a client that does not read): waited at most twice, then cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from rtp_mm.errors import EngineDead
from rtp_mm.server.state import ENGINE_KEY, SETTINGS_KEY

logger = logging.getLogger(__name__)

HANDLER_GRACE_S = 1.0  # aiohttp's shutdown_timeout: only stragglers are left when it starts waiting
FAIL_GRACE_S = 1.0  # for failed handlers to write their error event (milliseconds, unless a client stalls)
POLL_S = 0.05  # how often the drain looks at the count: cheap, and the exit is at most this much later


class InFlight:
    """HTTP requests inside a handler (body upload, images, engine, response or stream). Event loop only."""

    def __init__(self) -> None:
        self.count = 0


IN_FLIGHT_KEY = web.AppKey("in_flight", InFlight)


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    in_flight = request.app[IN_FLIGHT_KEY]
    in_flight.count += 1
    try:
        return await handler(request)
    finally:
        in_flight.count -= 1


def install(app: web.Application) -> None:
    """Count the app's requests in flight and drain them on shutdown (``SHUTDOWN_TIMEOUT_S`` from its settings).
    The server must run the app with ``shutdown_timeout=HANDLER_GRACE_S``, as ``run_server`` and ``BackgroundServer``
    do."""
    app[IN_FLIGHT_KEY] = InFlight()
    app.middlewares.append(in_flight_middleware)
    app.on_shutdown.append(drain)


async def drain(app: web.Application) -> None:
    """Wait up to ``SHUTDOWN_TIMEOUT_S`` for the requests in flight; then fail the server's engine streams and give
    their handlers ``FAIL_GRACE_S`` to answer with the error."""
    in_flight = app[IN_FLIGHT_KEY]
    timeout = app[SETTINGS_KEY].server.shutdown_timeout_s
    loop = asyncio.get_running_loop()
    if in_flight.count:
        logger.info("shutting down: %d requests in flight get up to SHUTDOWN_TIMEOUT_S=%g s", in_flight.count, timeout)
    if await _wait_idle(in_flight, loop.time() + timeout):
        return
    logger.warning("SHUTDOWN_TIMEOUT_S=%g ran out with %d requests in flight: failing them", timeout, in_flight.count)
    error = EngineDead(f"server shutting down: SHUTDOWN_TIMEOUT_S={timeout:g} ran out")
    engine = app[ENGINE_KEY]
    # Failed again at every poll: a handler that was still decoding images submits its requests after the first.
    if not await _wait_idle(in_flight, loop.time() + FAIL_GRACE_S, lambda: engine.fail_streams(error)):
        logger.warning("%d requests still in flight after failing them: aiohttp cancels them", in_flight.count)


async def _wait_idle(in_flight: InFlight, deadline: float, each_poll: Callable[[], Any] | None = None) -> bool:
    """True once no request is in flight; False at ``deadline``. Polled: the count has nothing to await, and the
    second phase must run ``each_poll`` between looks anyway."""
    loop = asyncio.get_running_loop()
    while True:
        if each_poll is not None:
            each_poll()
        if not in_flight.count:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
