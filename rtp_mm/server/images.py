"""Image intake: turn the image references of a request into decoded RGB images, within limits, off the event loop.

A reference is a string (native ``images`` entries, OpenAI ``image_url.url``):

* ``data:image/<fmt>;base64,<...>`` or bare base64: decoded here;
* ``upload://<part name>``: a file part of the same multipart/form-data request;
* ``http(s)://...``: fetched only when ``IMAGE_URL_HOSTS`` allow-lists the host ("*": any host). Every address the
  host resolves to, on every redirect hop, must be a public one (no loopback, private, link-local or reserved
  ranges: a server-side request forgery guard), at most ``MAX_REDIRECTS`` hops, ``IMAGE_MAX_MB`` bytes and
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
import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from PIL import Image

from rtp_mm.config import ServerConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.server.errors import PayloadTooLarge, UnprocessableImage

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


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PublicAddressResolver(AbstractResolver):
    """Resolves like aiohttp but refuses hosts with any non-public address. The connection uses exactly the addresses
    checked here, so a DNS answer cannot change between the check and the connect (DNS rebinding)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        blocked = sorted({r["host"] for r in results if not _is_public(r["host"])})
        if blocked:
            raise UnprocessableImage(f"image host {host!r} resolves to non-public address(es) {blocked}", "image_url")
        return results

    async def close(self) -> None:
        await self._inner.close()


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

    async def load(self, refs: list[str], uploads: dict[str, bytes]) -> list[Any]:
        """Decoded images (or, with ``prepare``, the encoder inputs), in order."""
        if len(refs) > self.limits.max_count:
            raise InvalidRequest(f"{len(refs)} images in one request; IMAGE_MAX_COUNT allows {self.limits.max_count}")
        blobs = [await self._bytes(i, ref, uploads) for i, ref in enumerate(refs)]
        unused = set(uploads) - {r[len(UPLOAD_SCHEME) :] for r in refs}
        if unused:
            raise InvalidRequest(f"uploaded part(s) {sorted(unused)} are not referenced as upload://<name>")
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
        root = Path(self.limits.local_dir).resolve()
        path = (root / ref).resolve()  # an absolute ref replaces root; either way it must land inside root
        if not path.is_relative_to(root):
            raise InvalidRequest(f"image {index}: path {ref!r} is outside IMAGE_LOCAL_DIR")
        if not path.is_file():
            raise InvalidRequest(f"image {index}: no file {ref!r} in IMAGE_LOCAL_DIR")
        if path.stat().st_size > self.limits.max_bytes:
            raise PayloadTooLarge(f"image {index}: {ref!r} is larger than IMAGE_MAX_MB")
        return path.read_bytes()

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
            raise UnprocessableImage(f"image {index}: fetching {url!r} failed: {e}", "image_url") from None

    async def _fetch_following_redirects(self, index: int, url: str) -> bytes:
        assert self.session is not None
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(index, url)
            async with self.session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status != 200:
                    raise UnprocessableImage(f"image {index}: {url!r} answered HTTP {resp.status}", "image_url")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > self.limits.max_bytes:
                        raise PayloadTooLarge(f"image {index}: {url!r} is larger than IMAGE_MAX_MB")
                return bytes(data)
        raise UnprocessableImage(f"image {index}: more than {MAX_REDIRECTS} redirects", "image_url")

    def _check_host(self, index: int, url: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidRequest(f"image {index}: {url!r} is not an http(s) URL")
        if "*" not in self.limits.url_hosts and host not in self.limits.url_hosts:
            raise InvalidRequest(f"image {index}: host {host!r} is not in IMAGE_URL_HOSTS")
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: its addresses are checked by PublicAddressResolver when connecting
        if not _is_public(str(literal)):
            raise UnprocessableImage(f"image {index}: {host!r} is a non-public address", "image_url")


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
    undecodable = (Image.DecompressionBombError, Image.UnidentifiedImageError, OSError, SyntaxError, ValueError)
    try:
        image = Image.open(io.BytesIO(data))
    except undecodable as e:
        raise UnprocessableImage(f"image {index} is not a decodable image ({type(e).__name__}: {e})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image {index} is {width}x{height} = {width * height} pixels; IMAGE_MAX_PIXELS allows {max_pixels}"
        )
    try:
        image.load()
        return image.convert("RGB")
    except undecodable as e:
        raise UnprocessableImage(f"image {index} is not a decodable image ({type(e).__name__}: {e})") from None
