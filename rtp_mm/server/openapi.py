"""``GET /openapi.json``: an OpenAPI 3.1 description generated from the wire models, so clients, code generators and
fuzzers read the same types and ranges the server enforces.

Generation routes take ``application/json`` or ``multipart/form-data`` (a ``request`` part holding the JSON body plus
file parts referenced as ``upload://<part name>``). Errors are described in each route's own shape: RTP-LLM's
``{"error_code", "message"}`` on native routes, OpenAI's ``{"error": {...}}`` under ``/v1/``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rtp_mm.server.adapters import UpdateBody
from rtp_mm.server.openai_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from rtp_mm.server.protocol import NativeRequestBody, TokenizerEncodeBody

PATH = "/openapi.json"
_REF = "#/components/schemas/{model}"

_NATIVE_ERROR = {
    "type": "object",
    "required": ["error_code", "message"],
    "properties": {"error_code": {"type": "integer"}, "message": {"type": "string"}},
}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["integer", "null"]},
            },
        }
    },
}
# (path, model, summary, streams, takes images)
_POSTS: tuple[tuple[str, type[BaseModel], str, bool, bool], ...] = (
    ("/", NativeRequestBody, "Generate (RTP-LLM's native request; SSE with yield_generator)", True, True),
    ("/tokenizer/encode", TokenizerEncodeBody, "Token ids and token texts of a prompt", False, False),
    ("/update", UpdateBody, "LoRA adapters become peft_info.lora_info (RTP-LLM hot update)", False, False),
    ("/v1/chat/completions", ChatCompletionRequest, "OpenAI chat completions", True, True),
    ("/chat/completions", ChatCompletionRequest, "RTP-LLM's alias of /v1/chat/completions", True, True),
    ("/v1/completions", CompletionRequest, "OpenAI completions", True, False),
    ("/v1/embeddings", EmbeddingRequest, "OpenAI embeddings (embedding MODEL_TYPEs)", False, False),
)
_GETS = {
    "/": "RTP-LLM's home probe",
    "/health": "Liveness probe (also /status, /health_check, /GraphService/cm2_status, /SearchService/cm2_status)",
    "/worker_status": "Free KV cache and concurrency",
    "/metrics": "Prometheus metrics",
    "/v1/models": "The served model",
    PATH: "This document",
}


def _error_responses(path: str) -> dict[str, Any]:
    schema = {"$ref": _REF.format(model="OpenAIError" if path.startswith("/v1/") else "NativeError")}
    content = {"application/json": {"schema": schema}}
    return {
        str(status): {"description": why, "content": content}
        for status, why in (
            (400, "invalid request: the message names the field, the value and what is accepted"),
            (401, "missing or wrong API key (API_KEY is set)"),
            (408, "the body did not arrive within CLIENT_TIMEOUT_S"),
            (409, "over CONCURRENCY_LIMIT"),
            (413, "body, image bytes or image pixels over their limits"),
            (422, "an image that cannot be decoded or fetched"),
            (501, "not implemented for this model"),
            (504, "the request's timeout_ms ran out"),
        )
    }


def _post(path: str, model: type[BaseModel], summary: str, streams: bool, images: bool) -> dict[str, Any]:
    ref = {"$ref": _REF.format(model=model.__name__)}
    content: dict[str, Any] = {"application/json": {"schema": ref}}
    if images:
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "required": ["request"],
                "properties": {"request": {"type": "string", "description": "the JSON body"}},
                "additionalProperties": {"type": "string", "format": "binary", "description": "an upload:// file"},
            }
        }
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": content},
        "responses": {"200": {"description": "the answer", "content": ok}, **_error_responses(path)},
    }


@cache
def openapi_document() -> dict[str, Any]:
    models = sorted({model for _, model, *_ in _POSTS}, key=lambda m: m.__name__)
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    components = {**schemas.get("$defs", {}), "NativeError": _NATIVE_ERROR, "OpenAIError": _OPENAI_ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for path, summary in _GETS.items():
        paths.setdefault(path, {})["get"] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    for path, *rest in _POSTS:
        paths.setdefault(path, {})["post"] = _post(path, *rest)
    return {
        "openapi": "3.1.0",
        "info": {"title": "rtp-mm", "version": "1", "description": "RTP-LLM-compatible and OpenAI-compatible routes"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
