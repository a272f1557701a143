"""CORS: off unless ``CORS_ALLOW_ORIGINS`` is set; then web pages on those origins may call the API from a browser.

    cors.install(app, settings.server.cors_allow_origins)      # no-op for ()

Two parts, because neither can do both jobs:

* A middleware, the outermost, answers a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an
  allowed origin with 204 itself. Browsers send preflights without ``Authorization``: had it reached the auth
  middleware, ``API_KEY`` would answer 401 and the browser would never send the real request. Being outermost,
  preflights are not counted in the request metrics (they would all land under ``route="unmatched"``).
* An ``on_response_prepare`` hook puts ``Access-Control-Allow-Origin`` on every other response as its headers are
  sent. A middleware cannot: a stream's headers are on the wire once the handler has prepared it; and the hook also
  covers what the error and auth middlewares answer (401, 4xx), which a page must be able to read to show why.

Decisions:

* ``*`` answers ``Access-Control-Allow-Origin: *``. That is valid with the API key because the key travels in an
  explicit ``Authorization`` header, not as a browser credential (cookies, HTTP auth): no
  ``Access-Control-Allow-Credentials`` is ever sent. With a list, the request's ``Origin`` is echoed when listed and
  every response says ``Vary: Origin`` (also those without the header: a cache must not serve one origin's answer,
  with or without the header, to another).
* Allowed request headers: ``Authorization`` and ``Content-Type`` always (``Authorization`` is never covered by a
  wildcard), plus every header the preflight asks for that is a well-formed header name, echoed as most servers do.
  Browser SDKs add headers of their own (the ``openai`` package: ``X-Stainless-*``, ``OpenAI-Organization``) and a
  fixed list would break them; allowing a header the server never reads gives a page nothing, since the trust
  decision is the origin. Such answers say ``Vary: Access-Control-Request-Headers``.
* A preflight from an origin not allowed is not answered as one: it goes on as any ``OPTIONS`` request (405, or 401
  with ``API_KEY``), without CORS headers, so the browser blocks the call; so do all responses to such origins.
* Methods ``GET, POST, OPTIONS`` (every route's); ``Max-Age`` 600 s, so browsers ask again within minutes after the
  allowed origins change (Chrome caps it at 7200 s anyway).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping, Sequence
from typing import Any

from aiohttp import hdrs, web

ALLOW_METHODS = "GET, POST, OPTIONS"
ALWAYS_ALLOWED_HEADERS = ("Authorization", "Content-Type")
MAX_AGE_S = 600
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


class CorsPolicy:
    """The allowed origins, normalised by ``ServerConfig`` as browsers send them (lower case, no default port)."""

    def __init__(self, origins: Sequence[str]):
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``; None: not allowed."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None

    def preflight_headers(self, allow_origin: str, requested: str) -> dict[str, str]:
        names = list(ALWAYS_ALLOWED_HEADERS)
        seen = {n.lower() for n in names}
        for name in (n.strip() for n in requested.split(",")):
            if _HEADER_NAME.fullmatch(name) and name.lower() not in seen:
                seen.add(name.lower())
                names.append(name)
        vary = "Access-Control-Request-Headers" if self.any_origin else "Origin, Access-Control-Request-Headers"
        return {
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allow_origin,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(names),
            hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_S),
            hdrs.VARY: vary,
        }


def _add_vary(headers: MutableMapping[str, str], name: str) -> None:
    present = [v.strip().lower() for v in headers.get(hdrs.VARY, "").split(",") if v.strip()]
    if "*" not in present and name.lower() not in present:
        headers[hdrs.VARY] = ", ".join([headers[hdrs.VARY], name]) if present else name


def install(app: web.Application, origins: Sequence[str]) -> None:
    """Answer preflights and label responses for ``origins`` (``CORS_ALLOW_ORIGINS``); nothing at all when empty, so
    that with CORS off an ``OPTIONS`` request is answered as any other unrouted method."""
    if not origins:
        return
    policy = CorsPolicy(origins)

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            allow_origin = policy.allow_origin(request.headers.get(hdrs.ORIGIN))
            if allow_origin is not None:
                requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
                return web.Response(status=204, headers=policy.preflight_headers(allow_origin, requested))
        return await handler(request)

    async def label_response(request: web.Request, response: web.StreamResponse) -> None:
        if hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return  # a preflight answer, complete already
        if not policy.any_origin:
            _add_vary(response.headers, "Origin")
        allow_origin = policy.allow_origin(request.headers.get(hdrs.ORIGIN))
        if allow_origin is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow_origin

    # Outermost, before metrics, errors and auth (the list is not frozen until the app starts).
    app.middlewares.insert(0, cors_middleware)
    app.on_response_prepare.append(label_response)
