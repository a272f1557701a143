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
from typing import Any

from rtp_mm.api import MAX_LOGPROBS, GenerateConfig, RequestOutput
from rtp_mm.errors import GenerateConfigError
from rtp_mm.server.errors import InvalidParam
from rtp_mm.server.protocol import MAX_SEQUENCES_PER_REQUEST

MAX_N = 128
MAX_STOP = 16
_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "observation")
_COMMON = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "extra_configs",
        "max_tokens",
    }
)
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}

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

    def sequence_configs(self) -> list[GenerateConfig]:
        """n samples of one prompt; with a seed, sample j uses seed + j (else all n would be identical)."""
        seed = self.config.random_seed
        if seed is None or self.n == 1:
            return [self.config] * self.n
        return [self.config.updated(random_seed=(seed + j) % 2**64) for j in range(self.n)]


# ---- parsing ----------------------------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, low: float, high: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidParam(f"{name}={value!r} is invalid; accepted: a number in [{low}, {high}]", name)
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParam(f"{name}={value!r} is invalid; accepted: an integer in [{low}, {high}]", name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParam(f"{name}={value!r} must be a boolean", name)
    return value


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidParam(f"unknown field(s) {unknown}; this route accepts {sorted(allowed)}", unknown[0])


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise InvalidParam(f"stop={stop!r} must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return stops


def _unsupported(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise InvalidParam(f"response_format {kind!r} is not supported; only {{'type': 'text'}}", "response_format")
    if body.get("logit_bias"):
        raise InvalidParam("logit_bias is not supported", "logit_bias")
    if body.get("tools"):
        raise InvalidParam("tools (function calling) are not supported", "tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidParam("tool_choice is not supported", "tool_choice")


def _common(body: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> OpenAIRequest:
    _unsupported(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise InvalidParam("stream_options must be an object", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    n = _integer(body, "n", 1, MAX_N, 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidParam(f"seed={seed!r} must be an integer", "seed")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParam(f"model={model!r} must be a string", "model")
    config: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0) or 1e-6,  # top_p=0 means "the most likely token" here
        "top_k": 0,
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "stop_words_str": _stop(body),
        "random_seed": None if seed is None else seed % 2**64,  # OpenAI seeds may be negative
        "logprobs": logprobs,
    }
    if max_tokens is not None:
        config["max_new_tokens"] = max_tokens
    extra = body.get("extra_configs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise InvalidParam("extra_configs must be an object of GenerateConfig fields", "extra_configs")
        config.update(extra)
    try:
        generate_config = GenerateConfig.from_dict(config, strict=True)
    except GenerateConfigError as e:
        raise InvalidParam(e.message, "extra_configs" if extra else None) from None
    return OpenAIRequest(model, generate_config, n, stream, include_usage, logprobs)


def _content_text(content: Any, index: int, image_refs: list[str]) -> str:
    """A message's text; image parts add their URL to ``image_refs``."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidParam(f"messages[{index}].content must be a string or a list of parts", "messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise InvalidParam(f"messages[{index}]: an image_url part needs image_url.url (a string)", "messages")
            image_refs.append(url)
        else:
            raise InvalidParam(
                f"messages[{index}]: unsupported content part {part!r}; accepted: text, image_url", "messages"
            )
    return "".join(texts)


def parse_chat_request(body: dict[str, Any]) -> OpenAIRequest:
    _check_fields(body, CHAT_FIELDS)
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    want = _flag(body, "logprobs")
    if top is not None and not want:
        raise InvalidParam("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = _integer(body, "max_completion_tokens", 1, 2**31 - 1, None)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, 2**31 - 1, None)
    req = _common(body, max_tokens, (top or 0) if want else None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParam("messages must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidParam(f"messages[{i}] needs a role in {list(_ROLES)}", "messages")
        num_images = len(req.image_refs)
        text = _content_text(message.get("content"), i, req.image_refs)
        if len(req.image_refs) > num_images:
            # Keep the parts: LLM.chat_prompt renders each image part as the model's placeholder.
            req.messages.append({"role": message["role"], "content": message["content"]})
        else:
            req.messages.append({"role": message["role"], "content": text})
    return req


def _prompts(prompt: Any) -> list[str | list[int]]:
    def is_ids(p: Any) -> bool:
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str) and prompt:
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or is_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidParam("prompt must be a non-empty string, list of strings, token ids or lists of token ids", "prompt")


def parse_completion_request(body: dict[str, Any]) -> OpenAIRequest:
    _check_fields(body, COMPLETION_FIELDS)
    if _flag(body, "echo"):
        raise InvalidParam("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise InvalidParam("suffix is not supported", "suffix")
    logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS, None)
    req = _common(body, _integer(body, "max_tokens", 1, 2**31 - 1, 16), logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise InvalidParam("best_of other than n is not supported", "best_of")
    req.prompts = _prompts(body.get("prompt"))
    if len(req.prompts) * req.n > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidParam(f"prompts x n exceeds {MAX_SEQUENCES_PER_REQUEST} sequences", "n")
    return req


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
