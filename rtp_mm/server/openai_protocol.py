"""The OpenAI wire format: parsing ``/v1/chat/completions`` and ``/v1/completions`` bodies, and response shapes.

Field semantics follow OpenAI's API reference (peers reference, section 5), with OpenAI's defaults (temperature 1,
top_p 1; ``/v1/completions`` max_tokens 16). ``max_completion_tokens`` wins over ``max_tokens``. RTP-LLM's
``extra_configs`` (any GenerateConfig field, e.g. ``top_k``) is applied last.

Unknown-fields policy: fields OpenAI defines that change nothing here (``user``, ``metadata``, ``store``, ...) are
accepted and ignored; fields that would change the answer but are not supported (``suffix``, ``best_of`` > n) and
unknown names answer 400 with ``param`` set, never a silently different answer.

Structured outputs: ``response_format`` ``json_object`` / ``json_schema`` become GenerateConfig's ``json_schema``
(enforced by the grammar engine whether or not ``strict`` is set); ``logit_bias`` is GenerateConfig's. Tools: see
``tools``.

``echo`` (``/v1/completions``) puts the prompt before each completion: its text (a token-id prompt decoded) and, with
``logprobs``, its tokens' logprobs computed in the same prefill (the first token's ``null``), then the generated
tokens', EOS included, so that ``token_logprobs[len(prompt):]`` are exactly the generated tokens as lm-eval slices
them. ``max_tokens: 0`` generates nothing (finish_reason ``length``).
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
from rtp_mm.server.tools import ToolMode, template_messages
from rtp_mm.server.wire import validated
from rtp_mm.validation import FieldError

MAX_N = 128
MAX_STOP = 16
MAX_TOKENS = 2**31 - 1
_Role = Literal["system", "developer", "user", "assistant", "tool", "function", "observation"]
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Bias = Annotated[_Float, Field(ge=-100.0, le=100.0)]
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
_Stop = _Text | Annotated[list[_Text], Field(max_length=MAX_STOP)]
# A completion's prompt or an embedding's input: a text, token ids, or a list of either.
_Texts = (
    _Text | _TokenIds | Annotated[list[_Text], Field(min_length=1)] | Annotated[list[_TokenIds], Field(min_length=1)]
)


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


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message (sent back by the client)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message; the fields of OpenAI's message types that change nothing here (``refusal``, ...) are ignored."""

    role: _Role
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages


_FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(_Body):
    name: _FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent = any object
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: _FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent = any JSON value
    strict: StrictBool | None = None


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # with type json_schema


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
    # token id (a JSON key, so a string) -> bias in [-100, 100], at most 300 entries (as OpenAI)
    logit_bias: Annotated[dict[Annotated[int, Field(ge=0)], _Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None
    extra_configs: dict[str, Any] | None = Field(None, description="any GenerateConfig field (RTP-LLM), applied last")
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    parallel_tool_calls: StrictBool | None = None


class CompletionRequest(_Sampling):
    prompt: _Texts
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool | None = None  # the prompt before the completion, in text and logprobs
    # 0: no completion, the prompt only (with echo: its logprobs, what lm-eval's loglikelihood asks for)
    max_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)] | None = None
    suffix: None = None  # not supported
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None


class EmbeddingRequest(_Body):
    input: _Texts
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
    tools: ToolMode = ToolMode("none")
    echo: bool = False  # completions: the prompt (text, and logprobs with logprobs) before each completion

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


def _common(
    body: _Sampling, max_tokens: int | None, logprobs: int | None, json_schema: dict[str, Any] | None = None
) -> OpenAIRequest:
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
    if body.logit_bias:
        config["logit_bias"] = body.logit_bias
    if json_schema is not None:
        config["json_schema"] = json_schema
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


def _tool_mode(body: ChatCompletionRequest) -> ToolMode:
    tools = tuple(t.model_dump(exclude_none=True) for t in body.tools or ())
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, NamedToolChoice):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            message = f"tool_choice names {choice.function.name!r}, which is not in tools {names}"
            raise InvalidParam(message, "tool_choice")
        return ToolMode("named", tools, choice.function.name)
    if choice != "none" and not tools:
        raise InvalidParam(f"tool_choice {choice!r} needs tools", "tool_choice")
    return ToolMode(choice, tools)


def _response_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise InvalidParam("response_format of type json_schema needs json_schema: {name, schema}", "response_format")
    return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}


def parse_chat_request(data: Any) -> OpenAIRequest:
    body: ChatCompletionRequest = _validated(ChatCompletionRequest, data)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParam("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools = _tool_mode(body)
    schema = _response_schema(body)
    if schema is not None and tools.json_schema() is not None:
        raise InvalidParam("response_format and a named or required tool_choice both constrain the answer", "tools")
    req = _common(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, schema or tools.json_schema())
    req.tools = tools
    for message in body.messages:
        entry: dict[str, Any] = {"role": message.role, "content": _content_text(message, req.image_refs)}
        if message.tool_calls:
            entry["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
        for name in ("name", "tool_call_id"):
            if getattr(message, name) is not None:
                entry[name] = getattr(message, name)
        req.messages.append(entry)
    req.messages = template_messages(req.messages)
    return req


def parse_completion_request(data: Any) -> OpenAIRequest:
    body: CompletionRequest = _validated(CompletionRequest, data)
    req = _common(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs)
    if body.echo:
        req.echo = True
        if body.logprobs is not None:  # computed in the prefill, top-N as for the generated tokens
            req.config = req.config.updated(prompt_logprobs=body.logprobs)
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
    token_text: TokenText, token_ids: list[int], logprobs: list[dict[int, float] | None], top: int, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy logprobs of ``token_ids``; an entry None (an echoed prompt's first token, which nothing
    predicts) gives a null token_logprob and null top_logprobs. ``text_offset`` counts the token texts before each
    token, from ``offset``."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e[t] for t, e in zip(token_ids, logprobs, strict=False)],
        "top_logprobs": [
            None if e is None else {token_text(t): lp for t, lp in sorted(e.items(), key=lambda kv: -kv[1])[:top]}
            for e in logprobs
        ],
        "text_offset": offsets,
    }


def joined_logprobs(first: dict[str, Any] | None, then: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two consecutive runs of completion logprobs as one (an echoed prompt's, then the generated tokens')."""
    if first is None or then is None:
        return then if first is None else first
    return {key: first[key] + then[key] for key in first}
