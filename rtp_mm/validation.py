"""Turning a pydantic ``ValidationError`` into one message a user can act on: the field path, what was given (cut
short, so a huge value cannot bloat the answer) and what is accepted.

Shared by the engine's GenerateConfig (offline API) and the server's wire models, so both phrase errors the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

MAX_SHOWN_VALUE = 80


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]  # the path inside the validated object, e.g. ("messages", 0, "role")
    message: str  # "messages[0].role='robot': Input should be 'system', 'user' or 'assistant'"
    kind: str  # pydantic's error type, e.g. "missing", "string_too_short", "extra_forbidden"

    @property
    def path(self) -> str:
        return format_path(self.loc)


def format_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def field_errors(error: ValidationError) -> list[FieldError]:
    """Every error of ``error``, one per field. When a value matched no member of a union (``str | list[int]``),
    pydantic reports one error per member; the member that got deepest into the value is the form the client most
    likely meant, so its error is the one reported."""
    best: dict[tuple, tuple[tuple[int, bool], dict]] = {}
    for item in error.errors(include_url=False, include_context=False):
        raw = item["loc"]
        cut = next((i for i, p in enumerate(raw) if _is_union_tag(p)), len(raw))
        key = tuple(raw[:cut])  # the field the union belongs to (or the field itself)
        # Deepest first; at equal depth a value error ("too short") beats a type error: that member had the shape.
        score = (len(raw), not item["type"].endswith("_type"))
        if key not in best or score > best[key][0]:
            best[key] = (score, item)
    out: list[FieldError] = []
    for _, item in best.values():
        loc = tuple(p for p in item["loc"] if not _is_union_tag(p))
        path = format_path(loc) or "body"
        given = "" if item["type"] == "missing" else f"={shown(item.get('input'))}"
        message = item["msg"][0].lower() + item["msg"][1:]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        out.append(FieldError(loc, f"{path}{given}: {message}", item["type"]))
    return out


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member that failed as a path element: a type ("str", "list[int]",
    # "constrained-str", "function-after[...]") or a model's class name ("ImagePart"); field names here are lower
    # snake_case.
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper())


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
