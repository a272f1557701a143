"""Chat-message fields as the id-level chat builders of rtp-mm's tokenizer adapters read them."""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import InvalidRequest


def text_content(message: dict[str, Any], tokenizer: str) -> str:
    """A message's content as text (None is empty). Content parts (images) are refused: these builders render text
    only, and the vision families expand images before the tokenizer sees them."""
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise InvalidRequest(
            f"chat message content must be a string for the {tokenizer} tokenizer, got {type(content).__name__}"
        )
    return content
