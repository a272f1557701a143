"""What both wire protocols share below their models: parsing JSON bytes and validating a body against a pydantic
model, with the first field error turned into the route's own error type (RTP-LLM codes or OpenAI's ``param``).

JSON is parsed by pydantic-core's parser, which refuses what Python's ``json`` would pass on to crash later: nesting
deeper than its recursion limit (a RecursionError in Python's parser) and lone UTF-16 surrogates (``"\\ud800"``, which
no tokenizer can encode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from rtp_mm.errors import InvalidRequest
from rtp_mm.validation import FieldError, field_errors

M = TypeVar("M", bound=BaseModel)


def parse_json(raw: bytes) -> Any:
    try:
        return pydantic_core.from_json(raw)
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None


def validated(model: type[M], data: Any, to_error: Callable[[FieldError], InvalidRequest]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise to_error(field_errors(e)[0]) from None
