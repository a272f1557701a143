"""The intake both APIs share: reading a request body, loading its images, and holding its concurrency slots.

A body is plain JSON, or multipart/form-data with a ``request`` part (the JSON) plus file parts that the JSON
references as ``upload://<part name>``. Any other content type is read as JSON (``curl -d`` sends form-urlencoded
headers with a JSON body). aiohttp's ``client_max_size`` bounds plain bodies; multipart bodies are streamed, so their
limits are counted here. The whole body must arrive within ``CLIENT_TIMEOUT_S`` (408 otherwise), so a slow client
cannot hold a connection and a slot forever. JSON over ``JSON_OFF_LOOP_BYTES`` is parsed in a worker thread, so one
huge body does not stall every other connection.

Path of a request: the event loop reads the body; images (if any) are decoded, hashed and preprocessed in the image
pool; the engine thread tokenizes, encodes the images, admits, prefills and decodes. Prompts are never tokenized on
the event loop (docs/ARCHITECTURE.md, "The path of a request").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from rtp_mm.errors import InvalidRequest
from rtp_mm.server.errors import ClientTimeout, PayloadTooLarge
from rtp_mm.server.protocol import check_images
from rtp_mm.server.state import ENGINE_KEY, IMAGES_KEY, LIMITER_KEY, SETTINGS_KEY
from rtp_mm.server.wire import parse_json

REQUEST_PART = "request"
JSON_OFF_LOOP_BYTES = 1 << 20
_MULTIPART_ERRORS = (ValueError, AssertionError, HttpProcessingError)

T = TypeVar("T")


async def read_body(request: web.Request) -> tuple[Any, dict[str, bytes]]:
    """(parsed JSON body, uploaded files by part name)."""
    server = request.app[SETTINGS_KEY].server
    reading = _read_body(request, server.max_body_mb * 2**20, server.image_max_mb * 2**20)
    return await _in_time(reading, server.client_timeout_s)


async def _in_time(reading: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise ClientTimeout(f"the request body did not arrive within CLIENT_TIMEOUT_S={timeout_s:g} s") from None


async def _parse(raw: bytes) -> Any:
    if len(raw) > JSON_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


async def _read_body(request: web.Request, max_body_bytes: int, max_image_bytes: int) -> tuple[Any, dict[str, bytes]]:
    if request.content_type != "multipart/form-data":
        return await _parse(await request.read()), {}
    try:
        reader = await request.multipart()
    except _MULTIPART_ERRORS as e:
        raise InvalidRequest(f"malformed multipart/form-data body: {e}") from None
    body: Any = None
    uploads: dict[str, bytes] = {}
    total = 0
    while True:
        try:
            part = await reader.next()
        except _MULTIPART_ERRORS as e:  # a part with a broken header raises aiohttp's InvalidHeader
            raise InvalidRequest(f"malformed multipart/form-data body: {e}") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or not part.name:
            raise InvalidRequest("every multipart part needs a name (Content-Disposition: form-data; name=...)")
        own_limit = max_body_bytes if part.name == REQUEST_PART else max_image_bytes
        data = await _read_part(part, own_limit, max_body_bytes - total)
        total += len(data)
        if part.name == REQUEST_PART:
            if body is not None:
                raise InvalidRequest("more than one multipart part named 'request'")
            body = await _parse(data)
        else:
            if part.name in uploads:
                raise InvalidRequest(f"more than one multipart part named {part.name[:64]!r}")
            uploads[part.name] = data
    if body is None:
        raise InvalidRequest("a multipart/form-data request needs a part named 'request' holding the JSON body")
    return body, uploads


async def _read_part(part: BodyPartReader, own_limit: int, body_left: int) -> bytes:
    data = bytearray()
    while chunk := await _next_chunk(part):
        data += chunk
        if len(data) > body_left:
            raise PayloadTooLarge(f"the multipart body exceeds MAX_BODY_MB (at part {part.name[:64]!r})")
        if len(data) > own_limit:
            raise PayloadTooLarge(f"multipart part {part.name[:64]!r} exceeds IMAGE_MAX_MB ({own_limit} bytes)")
    return bytes(data)


async def _next_chunk(part: BodyPartReader) -> bytes:
    try:
        return await part.read_chunk(1 << 16)
    except _MULTIPART_ERRORS as e:
        raise InvalidRequest(f"malformed multipart/form-data body: {e}") from None


async def load_images(request: web.Request, refs: list[Any], uploads: dict[str, bytes]) -> list[Any]:
    """Decode every image (limits checked) and prepare it for the encoder, then refuse them if the model cannot
    take images."""
    if not refs and not uploads:
        return []
    images = await request.app[IMAGES_KEY].load(refs, uploads)
    engine = request.app[ENGINE_KEY]
    check_images(len(images), engine.info.model_type, engine.vision is not None)
    return images


@contextmanager
def sequence_slots(request: web.Request, num_sequences: int) -> Iterator[None]:
    """Hold ``num_sequences`` slots of CONCURRENCY_LIMIT (each sequence is a row of the engine's batch) while the
    request runs."""
    with request.app[LIMITER_KEY].slot(num_sequences):
        yield
