"""Function calling on ``/v1/chat/completions``: what ``tool_choice`` makes of a request, and tool calls read back
from the answer.

* ``none``: tools are not shown to the model; a plain answer.
* ``auto``: the tools are rendered through the model's chat template (it must have a tools section, else 400 naming
  the model type); the answer is read by the family's tool-call format (``PARSERS``): Qwen 2's
  ``<tool_call>{json}</tool_call>`` blocks, Llama 3's bare ``{"name", "parameters"}`` JSON, GLM-4's
  ``name\\n{arguments}``. Text that is no tool call stays the message content.
* a named function: the answer is constrained by the grammar engine to the function's parameter schema (it works on
  every model, whether or not its template knows tools, as vLLM does); the answer is that function's arguments.
* ``required``: the answer is constrained to a JSON array of ``{"name", "parameters"}`` calls of the given tools.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# An empty object schema: a function without declared parameters takes any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def wire(self, index: int | None = None) -> dict[str, Any]:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolMode:
    """What a request's ``tools`` / ``tool_choice`` mean for rendering, decoding and reading the answer."""

    kind: str  # "none" | "auto" | "named" | "required"
    tools: tuple[dict[str, Any], ...] = ()  # the OpenAI tool objects, rendered by the chat template
    name: str | None = None  # the named function

    @property
    def render_tools(self) -> list[dict[str, Any]] | None:
        return list(self.tools) if self.kind != "none" and self.tools else None

    def json_schema(self) -> dict[str, Any] | None:
        """The grammar the answer must follow (named / required), or None."""
        functions = {t["function"]["name"]: t["function"] for t in self.tools}
        if self.kind == "named":
            return functions[self.name].get("parameters") or _ANY_OBJECT
        if self.kind == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": f.get("parameters") or _ANY_OBJECT},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, f in functions.items()
            ]
            return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return None

    def calls(self, text: str, family: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished answer."""
        if self.kind == "named":
            return None, [ToolCall(self.name, text)]
        if self.kind == "required":
            try:
                return None, [ToolCall(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens: no complete call
                return text, []
        if self.kind == "auto":
            parser = PARSERS.get(family)
            if parser is not None:
                return parser(text, {t["function"]["name"] for t in self.tools})
        return text, []


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: an assistant's tool-call arguments as objects, not JSON text (the
    templates write ``arguments | tojson``)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_template_call(c) for c in calls]}
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    try:
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        pass  # not JSON text: the template gets it as sent
    return {**call, "function": function}


# ---- reading tool calls back, per family --------------------------------------------------------------------------
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call_from_json(text: str, names: set[str], args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Qwen 2 / 2.5 (and every Hermes-style template): ``<tool_call>{"name", "arguments"}</tool_call>`` blocks."""
    if "<tool_call>" not in text:
        return text, []
    calls = [c for c in (_call_from_json(m, names, "arguments") for m in _HERMES.findall(text)) if c is not None]
    content = text[: text.index("<tool_call>")].strip() or None
    return (content, calls) if calls else (text, [])


def parse_llama3_json(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Llama 3.1+: the whole answer is one ``{"name", "parameters"}`` object (optionally after ``<|python_tag|>``),
    or several separated by ``;``."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = [_call_from_json(part, names, "parameters") for part in body.split(";") if part.strip()]
    return (None, calls) if calls and all(c is not None for c in calls) else (text, [])  # type: ignore[misc]


def parse_glm4(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """GLM-4: the function name on the first line, its JSON arguments after it."""
    name, sep, rest = text.strip().partition("\n")
    if not sep or name.strip() not in names:
        return text, []
    try:
        json.loads(rest)
    except ValueError:
        return text, []
    return None, [ToolCall(name.strip(), rest.strip())]


# MODEL_TYPE family -> its tool-call format (the family names of rtp_mm/llm/models).
PARSERS: dict[str, Callable[[str, set[str]], tuple[str | None, list[ToolCall]]]] = {
    "qwen_2": parse_hermes,
    "llama": parse_llama3_json,
    "chatglm4v": parse_glm4,  # GLM-4V: its language model writes GLM-4 calls
}
