"""The built-in web playground: ``GET /playground`` and its two assets, static files shipped in the package.

The page is plain HTML, CSS and one script (``playground/``): no build step, nothing fetched from another origin. It
talks to this server's own routes (``/v1/models``, ``/worker_status``, ``/v1/chat/completions`` with images as
multipart parts), so it needs nothing the API does not already offer. The page itself is public (it holds no data);
its API calls carry the key the user types, kept in the page's memory only.

Every response here carries a strict Content-Security-Policy: scripts and styles from this origin only (no inline
code, no ``eval``), images from this origin or ``blob:`` (the attached files' thumbnails), requests to this origin only.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

ASSETS = Path(__file__).with_name("playground")
PATH = "/playground"
ASSET_PATH = "/playground/assets/"
_FILES = {"playground.js", "playground.css"}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The page and its assets need no API key (the calls they make do)."""
    return path == PATH or path.startswith(ASSET_PATH)


async def handle_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(ASSETS / "index.html", headers=SECURITY_HEADERS)


async def handle_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(ASSETS / name, headers=SECURITY_HEADERS)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(PATH, handle_page)
    router.add_get(ASSET_PATH + "{name}", handle_asset)
