"""Image intake: turn the image references of a request into decoded RGB images, within limits, off the event loop.

A reference is a string (native ``images`` entries, OpenAI ``image_url.url``):

* ``data:image/<fmt>;base64,<...>`` or bare base64: decoded here;
* ``upload://<part name>``: a file part of the same multipart/form-data request;
* ``http(s)://...``: fetched only when ``IMAGE_URL_HOSTS`` allow-lists the host ("*": any host), compared in the
  normalised form the HTTP client connects to. Every address the host resolves to and every address connected to,
  on every redirect hop, must be a public one (no loopback, private, link-local or reserved ranges: a server-side
  request forgery guard, see ``url_guard``), at most ``MAX_REDIRECTS`` hops, ``IMAGE_MAX_MB`` bytes and
  ``IMAGE_FETCH_TIMEOUT_S`` seconds in all;
* a local path: read only when ``IMAGE_LOCAL_DIR`` is set, and only from inside that folder (symlinks resolved).

Limits answer 4xx with error code 507: more than ``IMAGE_MAX_COUNT`` images (400), more than ``IMAGE_MAX_MB`` bytes
or ``IMAGE_MAX_PIXELS`` pixels in one image (413; the pixel count is read from the header before any pixel is
decoded, which defeats decompression bombs), data that is not a decodable image (422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from PIL import Image
from yarl import URL

from rtp_mm.config import ServerConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.server import url_guard
from rtp_mm.server.errors import PayloadTooLarge, UnprocessableImage
from rtp_mm.server.url_guard import PublicAddressResolver, make_fetch_connector

__all__ = ["ImageIntake", "ImageLimits", "PublicAddressResolver", "decode_image", "make_fetch_connector"]

UPLOAD_SCHEME = "upload://"
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class ImageLimits:
    max_count: int
    max_bytes: int
    max_pixels: int
    url_hosts: tuple[str, ...]
    local_dir: str
    fetch_timeout_s: float

    @classmethod
    def from_server_config(cls, server: ServerConfig) -> ImageLimits:
        return cls(
            max_count=server.image_max_count,
            max_bytes=server.image_max_mb * 2**20,
            max_pixels=server.image_max_pixels,
            url_hosts=server.image_url_hosts,
            local_dir=server.image_local_dir,
            fetch_timeout_s=server.image_fetch_timeout_s,
        )


def _is_public(address: str) -> bool:  # the predicate's old name, for existing callers
    return url_guard.is_public_address(address)


class ImageIntake:
    """Loads the images of one request. Shared by all requests; owns nothing but borrowed resources:
    ``executor`` decodes (CPU work off the event loop) and ``session`` fetches remote images (None: never fetches).
    ``prepare`` (the engine client's, for a vision model) turns each decoded image into the encoder's input in the
    same pool job, so an image crosses to a pool thread once and reaches the engine ready to encode."""

    def __init__(
        self,
        limits: ImageLimits,
        executor: Executor,
        session: aiohttp.ClientSession | None,
        prepare: Callable[[Image.Image, int], Any] | None = None,
    ):
        self.limits = limits
        self.executor = executor
        self.session = session
        self.prepare = prepare
        self._allowed_hosts = {url_guard.normalise_allowed_host(h) for h in limits.url_hosts}

    async def load(self, refs: list[str], uploads: dict[str, bytes]) -> list[Any]:
        """Decoded images (or, with ``prepare``, the encoder inputs), in order."""
        if len(refs) > self.limits.max_count:
            raise InvalidRequest(f"{len(refs)} images in one request; IMAGE_MAX_COUNT allows {self.limits.max_count}")
        blobs = [await self._bytes(i, ref, uploads) for i, ref in enumerate(refs)]
        unused = set(uploads) - {r[len(UPLOAD_SCHEME) :] for r in refs}
        if unused:
            names = ", ".join(repr(n[:64]) for n in sorted(unused)[:5]) + (", ..." if len(unused) > 5 else "")
            raise InvalidRequest(f"{len(unused)} uploaded part(s) ({names}) are not referenced as upload://<name>")
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.executor, self._decode, b, i) for i, b in enumerate(blobs)]
        return list(await asyncio.gather(*jobs))

    def _decode(self, data: bytes, index: int) -> Any:
        image = decode_image(data, self.limits.max_pixels, index)
        return image if self.prepare is None else self.prepare(image, index)

    async def _bytes(self, index: int, ref: Any, uploads: dict[str, bytes]) -> bytes:
        if not isinstance(ref, str) or not ref:
            raise InvalidRequest(f"image {index} must be a non-empty string, got {type(ref).__name__}")
        if ref.startswith(UPLOAD_SCHEME):
            name = ref[len(UPLOAD_SCHEME) :]
            if name not in uploads:
                raise InvalidRequest(f"image {index}: {ref!r} names no uploaded part; parts: {sorted(uploads)}")
            return self._check_size(index, uploads[name])
        if ref.startswith("data:"):
            return self._check_size(index, _data_url_bytes(index, ref))
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("http", "https"):
            return await self._fetch(index, ref)
        if scheme:
            raise InvalidRequest(f"image {index}: URL scheme {scheme!r} is not supported (data:, upload://, http(s))")
        if self.limits.local_dir and _looks_like_path(ref):
            return await asyncio.to_thread(self._read_local, index, ref)
        try:
            data = base64.b64decode(ref, validate=True)
        except (binascii.Error, ValueError):
            hint = "" if self.limits.local_dir else "; local image paths are disabled (set IMAGE_LOCAL_DIR)"
            raise InvalidRequest(
                f"image {index} is neither a data: URL, valid base64, an upload:// reference nor an http(s) URL{hint}"
            ) from None
        return self._check_size(index, data)

    def _check_size(self, index: int, data: bytes) -> bytes:
        if len(data) > self.limits.max_bytes:
            raise PayloadTooLarge(f"image {index} has {len(data)} bytes; IMAGE_MAX_MB allows {self.limits.max_bytes}")
        return data

    def _read_local(self, index: int, ref: str) -> bytes:
        shown = ref if len(ref) <= 200 else ref[:200] + "..."
        if "\x00" in ref:  # the OS cannot take it (Python raises ValueError)
            raise InvalidRequest(f"image {index}: path {shown!r} contains a NUL byte")
        root = Path(self.limits.local_dir).resolve()
        try:
            path = (root / ref).resolve()  # an absolute ref replaces root; either way it must land inside root
            if not path.is_relative_to(root):
                raise InvalidRequest(f"image {index}: path {shown!r} is outside IMAGE_LOCAL_DIR")
            if not path.is_file():
                raise InvalidRequest(f"image {index}: no file {shown!r} in IMAGE_LOCAL_DIR")
            if path.stat().st_size > self.limits.max_bytes:
                raise PayloadTooLarge(f"image {index}: {shown!r} is larger than IMAGE_MAX_MB")
            return path.read_bytes()
        except OSError as e:  # a name too long, a file that cannot be read: the request's fault, not the server's
            raise InvalidRequest(f"image {index}: cannot read {shown!r} in IMAGE_LOCAL_DIR ({e.strerror})") from None

    async def _fetch(self, index: int, url: str) -> bytes:
        if self.session is None or not self.limits.url_hosts:
            raise InvalidRequest(f"image {index}: http(s) image URLs are disabled (set IMAGE_URL_HOSTS to allow hosts)")
        try:
            return await asyncio.wait_for(self._fetch_following_redirects(index, url), self.limits.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise UnprocessableImage(
                f"image {index}: fetching {url!r} took more than {self.limits.fetch_timeout_s} s", "image_url"
            ) from None
        except aiohttp.ClientError as e:
            raise UnprocessableImage(f"image {index}: fetching {url!r} failed: {_describe(e)}", "image_url") from None

    async def _fetch_following_redirects(self, index: int, url: str | URL) -> bytes:
        assert self.session is not None
        for _ in range(MAX_REDIRECTS + 1):
            # The parsed URL that was checked is the one requested: no second parse can see another host.
            target = self._check_host(index, url)
            shown = str(target)
            async with self.session.get(target, allow_redirects=False) as resp:
                if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                    try:
                        url = target.join(URL(resp.headers["Location"]))
                    except ValueError:
                        raise UnprocessableImage(
                            f"image {index}: {shown!r} redirected to an invalid URL", "image_url"
                        ) from None
                    continue
                if resp.status != 200:
                    raise UnprocessableImage(f"image {index}: {shown!r} answered HTTP {resp.status}", "image_url")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > self.limits.max_bytes:
                        raise PayloadTooLarge(f"image {index}: {shown!r} is larger than IMAGE_MAX_MB")
                return bytes(data)
        raise UnprocessableImage(f"image {index}: more than {MAX_REDIRECTS} redirects", "image_url")

    def _check_host(self, index: int, url: str | URL) -> URL:
        """The URL to request, once its host, as the HTTP client will read it (IDNA-mapped, IP literals in any
        notation parsed), is allow-listed and not a non-public address. Called on every redirect hop."""
        try:
            target, host = url_guard.normalise_url(url)
        except url_guard.BadUrl as e:
            raise InvalidRequest(f"image {index}: {e}") from None
        if "*" not in self._allowed_hosts and str(host) not in self._allowed_hosts:
            raise InvalidRequest(f"image {index}: host {str(host)!r} is not in IMAGE_URL_HOSTS")
        try:
            url_guard.check_public_host(host)
        except url_guard.NonPublicHost as e:
            raise UnprocessableImage(f"image {index}: {e}", "image_url") from None
        return target


def _describe(error: aiohttp.ClientError) -> str:
    """A client error in words: no reprs of objects (connection keys, SSL contexts) reach the error body."""
    if isinstance(error, aiohttp.ClientConnectorError):
        if url_guard.is_refused_connection(error.os_error):
            return f"connecting to {error.host} reached a non-public address (refused)"
        return f"cannot connect to {error.host}:{error.port} ({error.os_error.strerror or 'connection failed'})"
    text = str(error)
    plain = text and not _REPR.search(text)
    return f"{type(error).__name__}: {text}" if plain else type(error).__name__


_REPR = re.compile(r"<|>|\b0x[0-9a-fA-F]{4,}|\b[A-Za-z_]\w*\(")


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or "." in ref.rsplit("/", 1)[-1]


def _data_url_bytes(index: int, ref: str) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequest(f"image {index}: a data: URL must be data:image/<format>;base64,<data>")
    mime = header[len("data:") : -len(";base64")]
    if mime and not mime.startswith("image/"):
        raise UnprocessableImage(f"image {index}: data: URL of type {mime!r} is not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {index}: the data: URL holds invalid base64") from None


def decode_image(data: bytes, max_pixels: int, index: int = 0) -> Image.Image:
    """Decode to RGB. Runs in a worker thread. The pixel limit is checked on the header, before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except _UNDECODABLE as e:
        raise _decode_error(index, e) from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image {index} is {width}x{height} = {width * height} pixels; IMAGE_MAX_PIXELS allows {max_pixels}"
        )
    try:
        image.load()
        return image.convert("RGB")
    except _UNDECODABLE as e:
        raise _decode_error(index, e) from None


_UNDECODABLE = (Image.DecompressionBombError, Image.UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _decode_error(index: int, error: Exception) -> Exception:
    if isinstance(error, Image.DecompressionBombError):  # PIL's own pixel limit, met before ours: too large
        return PayloadTooLarge(f"image {index} has more pixels than the decoder's decompression-bomb limit")
    if isinstance(error, Image.UnidentifiedImageError):  # its message shows the buffer's repr and heap address
        return UnprocessableImage(f"image {index} is not a decodable image (unknown format)")
    text = str(error)
    detail = f"{type(error).__name__}: {text}" if text and not _REPR.search(text) else type(error).__name__
    return UnprocessableImage(f"image {index} is not a decodable image ({detail})")
