"""Reading a request body: plain JSON, or multipart/form-data with a ``request`` part (the JSON) plus file parts that
the JSON references as ``upload://<part name>``.

Any other content type is read as JSON (``curl -d`` sends form-urlencoded headers with a JSON body). aiohttp's
``client_max_size`` bounds plain bodies; multipart bodies are streamed, so their limits are counted here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import BodyPartReader, web

from rtp_mm.errors import InvalidRequest
from rtp_mm.server.errors import PayloadTooLarge
from rtp_mm.server.protocol import parse_json_body

REQUEST_PART = "request"


async def read_body(
    request: web.Request, max_body_bytes: int, max_image_bytes: int
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(JSON body, uploaded files by part name)."""
    if request.content_type != "multipart/form-data":
        return parse_json_body(await request.read()), {}
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as e:
        raise InvalidRequest(f"malformed multipart/form-data body: {e}") from None
    body: dict[str, Any] | None = None
    uploads: dict[str, bytes] = {}
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError) as e:
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
            body = parse_json_body(data)
        else:
            if part.name in uploads:
                raise InvalidRequest(f"more than one multipart part named {part.name!r}")
            uploads[part.name] = data
    if body is None:
        raise InvalidRequest("a multipart/form-data request needs a part named 'request' holding the JSON body")
    return body, uploads


async def _read_part(part: BodyPartReader, own_limit: int, body_left: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(1 << 16):
        data += chunk
        if len(data) > body_left:
            raise PayloadTooLarge(f"the multipart body exceeds MAX_BODY_MB (at part {part.name!r})")
        if len(data) > own_limit:
            raise PayloadTooLarge(f"multipart part {part.name!r} exceeds IMAGE_MAX_MB ({own_limit} bytes)")
    return bytes(data)
