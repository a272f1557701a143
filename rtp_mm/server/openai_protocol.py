"""The OpenAI wire format: parsing ``/v1/chat/completions`` and ``/v1/completions`` bodies, and response shapes.

Field semantics follow OpenAI's API reference (peers reference, section 5), with OpenAI's defaults (temperature 1,
top_p 1; ``/v1/completions`` max_tokens 16). ``max_completion_tokens`` wins over ``max_tokens``. RTP-LLM's
``extra_configs`` (any GenerateConfig field, e.g. ``top_k``) is applied last.

Unknown-fields policy: fields OpenAI defines that change nothing here (``user``, ``metadata``, ``store``, ...) are
accepted and ignored; fields that would change the answer but are not supported (``response_format`` json modes,
``tools``, ``logit_bias``, ``echo``, ``suffix``, ``best_of`` > n) and unknown names answer 400 with ``param`` set,
never a silently different answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag

from rtp_mm.api import MAX_LOGPROBS, GenerateConfig, RequestOutput
from rtp_mm.errors import GenerateConfigError
from rtp_mm.server.errors import InvalidParam
from rtp_mm.server.protocol import MAX_SEQUENCES_PER_REQUEST
from rtp_mm.server.wire import validated
from rtp_mm.validation import FieldError

MAX_N = 128
MAX_STOP = 16
MAX_TOKENS = 2**31 - 1
_Role = Literal["system", "developer", "user", "assistant", "tool", "function", "observation"]
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
_Stop = _Text | Annotated[list[_Text], Field(max_length=MAX_STOP)]


# ---- the wire models (``/openapi.json`` is generated from them) ----------------------------------------------------
class _Body(BaseModel):
    """Unknown field names are refused (400 naming them), never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: _Text
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | _Text


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind)


# Chosen by "type"; the tags are the class names, so error paths show the field names only (see rtp_mm.validation).
_ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
    Discriminator(
        _part_kind,
        custom_error_type="content_part",
        custom_error_message="a content part is {'type': 'text', 'text': ...} or {'type': 'image_url', 'image_url': "
        "{'url': ...}}",
    ),
]


class ChatMessage(BaseModel):
    """A message; the fields of OpenAI's message types that change nothing here (``name``, ...) are ignored."""

    role: _Role
    content: str | list[_ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text"]  # json_object / json_schema: not supported yet (400 naming response_format)


class _Sampling(_Body):
    """The fields both generation routes share (OpenAI's defaults: temperature 1, top_p 1)."""

    model: str | None = None
    temperature: Annotated[_Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[_Float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    stop: _Stop | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[_Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[_Float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None  # not supported yet: only {} or null
    user: str | None = None
    extra_configs: dict[str, Any] | None = Field(None, description="any GenerateConfig field (RTP-LLM), applied last")
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None  # function calling: not supported yet
    tool_choice: Literal["none", "auto"] | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    parallel_tool_calls: StrictBool | None = None


class CompletionRequest(_Sampling):
    prompt: (
        _Text
        | _TokenIds
        | Annotated[list[_Text], Field(min_length=1)]
        | Annotated[list[_TokenIds], Field(min_length=1)]
    )
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Literal[False] | None = None  # not supported yet
    suffix: None = None  # not supported
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None


class EmbeddingRequest(_Body):
    input: (
        _Text
        | _TokenIds
        | Annotated[list[_Text], Field(min_length=1)]
        | Annotated[list[_TokenIds], Field(min_length=1)]
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    is_query: StrictBool = Field(False, description="rtp-mm: SGPT query brackets instead of document ones")


TokenText = Callable[[int], str]


@dataclass
class OpenAIRequest:
    """A parsed OpenAI body. ``prompts`` holds text or token ids (completions) or is empty (chat: ``messages``)."""

    model: str | None
    config: GenerateConfig
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-N alternatives per token; None = no logprobs
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    image_refs: list[str] = field(default_factory=list)

    @property
    def total_sequences(self) -> int:
        return max(len(self.prompts), 1) * self.n

    def sequence_configs(self) -> list[GenerateConfig]:
        """n samples of one prompt; with a seed, sample j uses seed + j (else all n would be identical)."""
        seed = self.config.random_seed
        if seed is None or self.n == 1:
            return [self.config] * self.n
        return [self.config.updated(random_seed=(seed + j) % 2**64) for j in range(self.n)]


# ---- parsing ---------------------------------------------------------------------------------------------------------
def openai_error(error: FieldError) -> InvalidParam:
    """``param`` names the top-level field; the message carries the whole path."""
    return InvalidParam(error.message, str(error.loc[0]) if error.loc else None)


def _validated(model: type[_Body], data: Any) -> Any:
    if not isinstance(data, dict):
        raise InvalidParam(f"request body must be a JSON object, got {type(data).__name__}")
    return validated(model, data, openai_error)


def _common(body: _Sampling, max_tokens: int | None, logprobs: int | None) -> OpenAIRequest:
    if body.stream_options is not None and not body.stream:
        raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
    stop = body.stop or []
    config: dict[str, Any] = {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": (1.0 if body.top_p is None else body.top_p) or 1e-6,  # top_p=0 means "the most likely token" here
        "top_k": 0,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "stop_words_str": [stop] if isinstance(stop, str) else stop,
        "random_seed": None if body.seed is None else body.seed % 2**64,  # OpenAI seeds may be negative
        "logprobs": logprobs,
    }
    if max_tokens is not None:
        config["max_new_tokens"] = max_tokens
    config.update(body.extra_configs or {})
    try:
        generate_config = GenerateConfig.from_dict(config, strict=True)
    except GenerateConfigError as e:
        raise InvalidParam(e.message, "extra_configs" if body.extra_configs else None) from None
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return OpenAIRequest(body.model, generate_config, body.n or 1, bool(body.stream), include_usage, logprobs)


def _content_text(message: ChatMessage, image_refs: list[str]) -> str | list[dict[str, Any]]:
    """A message's content for the chat template: text, or (with images) its parts, each image part adding its URL
    to ``image_refs`` (LLM.chat_prompt renders each as the model's placeholder)."""
    if not isinstance(message.content, list):
        return message.content or ""
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ImagePart):
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            image_refs.append(url)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": part.text})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def parse_chat_request(data: Any) -> OpenAIRequest:
    body: ChatCompletionRequest = _validated(ChatCompletionRequest, data)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParam("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    req = _common(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    for message in body.messages:
        req.messages.append({"role": message.role, "content": _content_text(message, req.image_refs)})
    return req


def parse_completion_request(data: Any) -> OpenAIRequest:
    body: CompletionRequest = _validated(CompletionRequest, data)
    req = _common(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs)
    if body.best_of is not None and body.best_of != req.n:
        raise InvalidParam("best_of other than n is not supported", "best_of")
    prompt = body.prompt
    single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
    req.prompts = [prompt] if single else list(prompt)
    if len(req.prompts) * req.n > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidParam(f"prompts x n exceeds {MAX_SEQUENCES_PER_REQUEST} sequences", "n")
    return req


def parse_embedding_request(data: Any) -> EmbeddingRequest:
    return _validated(EmbeddingRequest, data)


def embedding_inputs(body: EmbeddingRequest) -> list[str] | list[list[int]]:
    """OpenAI's ``input`` as a list: strings, or token-id lists."""
    inputs = body.input
    single = isinstance(inputs, str) or isinstance(inputs[0], int)
    return [inputs] if single else list(inputs)


# ---- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(outs: list[RequestOutput], n: int) -> dict[str, Any]:
    """Prompt tokens counted once per prompt (not per sample), as OpenAI does."""
    prompt = sum(o.aux_info["input_len"] for o in outs[::n])
    cached = sum(o.aux_info["reuse_len"] for o in outs[::n])
    completion = sum(o.aux_info["output_len"] for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_entry(token_text: TokenText, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_text: TokenText, token_ids: list[int], logprobs: list[dict[int, float]], top: int
) -> dict[str, Any]:
    content = []
    for token, entry in zip(token_ids, logprobs, strict=False):
        item = _token_entry(token_text, token, entry[token])
        alternatives = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        item["top_logprobs"] = [_token_entry(token_text, t, lp) for t, lp in alternatives]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(
    token_text: TokenText, token_ids: list[int], logprobs: list[dict[int, float]], top: int, offset: int = 0
) -> dict[str, Any]:
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [entry[t] for t, entry in zip(token_ids, logprobs, strict=False)],
        "top_logprobs": [
            {token_text(t): lp for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:top]} for entry in logprobs
        ],
        "text_offset": offsets,
    }
