"""Chat messages with image parts -> text-only messages plus the images, in order.

OpenAI content parts (``{"type": "text"}``, ``{"type": "image_url", "image_url": {"url": ...}}``) and rtp-mm's
``{"type": "image", "image": <PIL image | bytes | path | data: URL>}`` are accepted. Each image part becomes the
model's placeholder text (``VisionModel.image_placeholder(k)``, k counting images over the whole conversation) and
is placed before the message's text: RTP-LLM's multimodal renderers put images ahead of the text (qwen_vl's
``Picture k:`` lines, chatglm4v's boi/eoi ids, llava's ``<image>\\n`` for the usual one-image-one-text message), so the
rendered prompt is the same whichever order the client listed the parts in.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from rtp_mm.errors import InvalidRequest


def has_image_parts(messages: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") in ("image_url", "image")
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )


def render_image_parts(
    messages: list[dict[str, Any]], placeholder: Callable[[int], str]
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages whose content is a string, the image sources in placeholder order)."""
    rendered: list[dict[str, Any]] = []
    sources: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        texts: list[str] = []
        marks: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "image"):
                marks.append(placeholder(len(sources)))
                sources.append(_source(part, i))
            else:
                accepted = "text, image_url, image"
                raise InvalidRequest(f"messages[{i}]: unsupported content part {part!r}; accepted: {accepted}")
        rendered.append({**message, "content": "".join(marks) + "".join(texts)})
    return rendered, sources


def _source(part: dict[str, Any], index: int) -> Any:
    if part["type"] == "image":
        if part.get("image") is None:
            raise InvalidRequest(f"messages[{index}]: an image part needs 'image'")
        return part["image"]
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"messages[{index}]: an image_url part needs image_url.url (a string)")
    return url


def load_source(source: Any, index: int) -> Any:
    """What the offline API accepts for one image (see ``runner.to_pil``): data: URLs become bytes; the offline API
    never fetches http(s) URLs (the server does, behind its allow-list)."""
    if not isinstance(source, str):
        return source
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidRequest(f"image {index}: a data: URL must be data:image/<format>;base64,<data>")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"image {index}: the data: URL holds invalid base64") from None
    if source.startswith(("http://", "https://")):
        raise InvalidRequest(f"image {index}: the offline API does not fetch URLs; pass the image, its bytes or a path")
    return source
