"""The one error middleware: typed rtp-mm exceptions become ``{"error_code": int, "message": str}`` bodies.

The error codes are RTP-LLM's (behaviour reference, section 1.9). The HTTP statuses deliberately deviate from
RTP-LLM, which answers 500 for everything except the concurrency limit (409): a client error is a 4xx here, so
clients, proxies and retry logic can tell "fix your request" from "the server failed".

=========================================  =====  ==========================================================
exception                                  HTTP   why
=========================================  =====  ==========================================================
``Unauthorized`` (401)                      401    API_KEY is set and the bearer token is missing or wrong
``CapacityExceeded`` (513)                 409    as RTP-LLM: more than CONCURRENCY_LIMIT requests in flight
``PayloadTooLarge`` (507)                  413    body, image bytes or image pixels over their limits
``UnprocessableImage`` (507)               422    image data that is not a decodable image, a failed fetch
``ClientTimeout`` (507)                    408    the body did not arrive within CLIENT_TIMEOUT_S (a slow client)
``InvalidRequest`` and subclasses          400    bad JSON, wrong types (507), no/empty prompt (509/510), prompt
                                                  too long (511), bad stop words (512), bad generate_config (516)
``RequestTimeout`` (603)                   504    the request's own ``timeout_ms`` ran out while generating;
                                                  408 would mean the client was slow to *send* the request
``RequestCancelled`` (499)                 499    as RTP-LLM (nginx's "client closed request"); rarely seen
``NotImplementedYetError``                 501    a registered feature that is not implemented yet
``EngineDead``                             503    the engine is shut down or stopped; the process should restart
any other ``RtpMmError``                   500    with its own code
any other exception                        500    514; the message names the exception, the traceback is logged
                                                  (RTP-LLM puts the traceback in the body; we do not leak it)
aiohttp ``HTTPException`` >= 400           same   507 for 4xx (unknown route, wrong method, body too large), 514
                                                  for 5xx
=========================================  =====  ==========================================================

A malformed request only ever fails itself: the middleware turns every exception into a response. Routes under
``/v1/`` answer OpenAI's error shape instead, ``{"error": {"message", "type", "param", "code"}}``, with the same HTTP
status and the RTP-LLM error code as ``code`` (an int), so one client can read both.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from rtp_mm.errors import (
    CapacityExceeded,
    EngineDead,
    ErrorCode,
    InvalidRequest,
    NotImplementedYetError,
    RequestCancelled,
    RequestTimeout,
    RtpMmError,
)
from rtp_mm.server.protocol import dumps

logger = logging.getLogger(__name__)


class Unauthorized(RtpMmError):
    """A missing or wrong bearer token. RTP-LLM has no auth, hence no code of its own: 401 doubles as the code."""

    error_code = 401  # type: ignore[assignment]


class InvalidParam(InvalidRequest):
    """A bad field of an OpenAI request; ``param`` names it in the error body."""

    def __init__(self, message: str, param: str | None = None, error_code: ErrorCode | None = None):
        super().__init__(message, error_code)
        self.param = param


class PayloadTooLarge(InvalidRequest):
    """A body, an image's bytes or its pixel count over the configured limit."""


class UnprocessableImage(InvalidRequest):
    """Well-formed JSON whose image cannot be used: not an image, undecodable, or its fetch failed."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ClientTimeout(InvalidRequest):
    """The client was too slow to send its request (408; a generation that runs out of time is 504)."""


# Checked in order, so subclasses come before their bases.
_STATUS_BY_ERROR: tuple[tuple[type[RtpMmError], int], ...] = (
    (Unauthorized, 401),
    (CapacityExceeded, 409),
    (PayloadTooLarge, 413),
    (UnprocessableImage, 422),
    (ClientTimeout, 408),
    (InvalidRequest, 400),
    (RequestTimeout, 504),
    (RequestCancelled, 499),
    (NotImplementedYetError, 501),
    (EngineDead, 503),
)


def error_body(error_code: int, message: str) -> dict[str, Any]:
    return {"error_code": int(error_code), "message": message}


def describe_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for any exception a handler raised."""
    if isinstance(exc, RtpMmError):
        status = next((s for cls, s in _STATUS_BY_ERROR if isinstance(exc, cls)), 500)
        return status, error_body(exc.error_code, exc.message)
    if isinstance(exc, web.HTTPException):
        code = ErrorCode.INPUT_FORMAT_ERROR if exc.status < 500 else ErrorCode.UNKNOWN_ERROR
        return exc.status, error_body(code, exc.text or exc.reason)
    return 500, error_body(ErrorCode.UNKNOWN_ERROR, f"{type(exc).__name__}: {exc}")


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "rate_limit_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}


def openai_error_body(status: int, body: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    """The OpenAI shape of a ``{"error_code", "message"}`` body."""
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": body["message"], "type": kind, "param": param, "code": body["error_code"]}}


def error_response(exc: BaseException, openai_shape: bool = False) -> web.Response:
    status, body = describe_error(exc)
    if openai_shape:
        body = openai_error_body(status, body, getattr(exc, "param", None))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(body, status=status, dumps=dumps, headers=headers)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects and the like are not errors
        return error_response(e, is_openai_path(request.path))
    except RtpMmError as e:
        status, _ = describe_error(e)
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.path, e.message)
        else:
            logger.info("%s %s rejected (%d, %d): %s", request.method, request.path, status, e.error_code, e.message)
        return error_response(e, is_openai_path(request.path))
    except Exception as e:
        logger.exception("%s %s failed with an unexpected error", request.method, request.path)
        return error_response(e, is_openai_path(request.path))
