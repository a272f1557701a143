"""The native (RTP-LLM-compatible) wire format: request parsing and response shapes of ``POST /``.

Parsing follows RTP-LLM's request extractor (behaviour reference, section 1.2):

* the prompt is ``prompt`` (alias ``text``), or ``prompt_batch`` (a list; the answer is ``{"response_batch": [...]}``);
* generation parameters come from ``generate_config`` (alias ``generation_config``) and, winning over it, from any
  GenerateConfig field given at the top level; ``gen_length`` stands for ``max_new_tokens`` when that is absent;
* the request streams when ``yield_generator`` (top level or in the config) or top-level ``stream`` is true.

Response shapes (section 1.4/1.5): one sequence is ``{"response", "finished", "aux_info"}``; with
``num_return_sequences`` = n > 0 the three fields are lists of n. Stream events are ``data:`` + JSON + CRLF CRLF with
no space after the colon, and the stream ends with the literal ``data:[done]``.

``images`` (alias ``urls``) is a list of references for one prompt, or one list per prompt of ``prompt_batch``; see
``images`` for the accepted forms and limits.

Deviations: a message list under ``prompt``/``messages`` (RTP-LLM's "chatapi" format) is refused with 507 until the
chat renderer exists; token-id prompts are not accepted here (the offline API takes them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from rtp_mm.api import GenerateConfig
from rtp_mm.errors import EmptyPromptError, ErrorCode, InvalidRequest, NotImplementedYetError
from rtp_mm.model_types import ModelTypeInfo

# One HTTP request may fan out into prompts x sequences engine requests; this bounds the fan-out so a single body
# cannot make the server build millions of requests.
MAX_SEQUENCES_PER_REQUEST = 1024

STREAM_DONE = b"data:[done]\r\n\r\n"

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerateConfig))
# RTP-LLM's aliases, applied only when the canonical name is absent.
_CONFIG_ALIASES = {"gen_length": "max_new_tokens"}
# Unknown-fields policy. RTP-LLM GenerateConfig fields that do not change the generated text are accepted and
# ignored; those that would change the answer are refused (516) when set, rather than silently not honoured; any
# other name inside generate_config is a typo, refused with 516. Top-level keys that are no GenerateConfig field are
# ignored, as RTP-LLM does (clients put request ids and the like there).
_IGNORED_CONFIG_FIELDS = frozenset(
    {
        "yield_generator",
        "is_streaming",
        "request_format",
        "chat_id",
        "task_id",
        "md5_value",
        "custom_prop",
        "using_hf_sampling",
        "pad_token_id",
        "bos_token_id",
    }
)
_UNSUPPORTED_CONFIG_FIELDS = frozenset(
    {
        "return_logits",
        "output_logits",
        "return_hidden_states",
        "output_hidden_states",
        "return_input_ids",
        "output_input_ids",
        "return_output_ids",
        "calculate_loss",
        "select_tokens_id",
        "select_tokens_str",
        "bad_words_list",
        "top_p_decay",
        "top_p_min",
        "top_p_reset_ids",
        "no_repeat_ngram_size",
    }
)


@dataclass(frozen=True)
class NativeRequest:
    """A parsed ``POST /`` body. Invariants: ``prompts`` is non-empty and holds non-empty strings; ``config`` is
    validated; ``return_incremental`` implies ``stream``."""

    prompts: list[str]
    batched: bool  # prompt_batch was given: answer {"response_batch": [...]}
    config: GenerateConfig
    stream: bool
    images: list[Any] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        """Sequences per prompt: num_return_sequences, or 1 when that is 0 (off)."""
        return max(self.config.num_return_sequences, 1)

    def sequence_configs(self) -> list[GenerateConfig]:
        """The config of each of the ``num_sequences`` samples of one prompt.

        A fixed ``random_seed`` would make the n samples identical, so sample j uses ``random_seed + j``; sample 0
        therefore equals a plain request with the same seed.
        """
        seed = self.config.random_seed
        if seed is None or self.num_sequences == 1:
            return [self.config] * self.num_sequences
        return [self.config.updated(random_seed=seed + j) for j in range(self.num_sequences)]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name}={value!r} must be a boolean")
    return value


def _check_prompt(prompt: Any, name: str) -> str:
    if isinstance(prompt, str):
        if not prompt:
            raise EmptyPromptError(f"{name} is an empty string")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        raise InvalidRequest(f"{name} is a message list (chat format); the native route takes a string for now")
    raise InvalidRequest(f"{name} must be a string, got {type(prompt).__name__}")


def _parse_prompts(body: dict[str, Any]) -> tuple[list[str], bool]:
    if "messages" in body:
        raise InvalidRequest("'messages' (chat format) is not supported on the native route yet; send 'prompt'")
    if body.get("prompt_batch") is not None:
        batch = body["prompt_batch"]
        if not isinstance(batch, list) or not batch:
            raise InvalidRequest("prompt_batch must be a non-empty list of strings")
        return [_check_prompt(p, f"prompt_batch[{i}]") for i, p in enumerate(batch)], True
    prompt = body.get("prompt", body.get("text"))
    if prompt is None:
        raise InvalidRequest("no prompt: give 'prompt' (or 'text') or 'prompt_batch'", ErrorCode.NO_PROMPT_ERROR)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        # RTP-LLM accepts a list under 'prompt' but answers only its first element.
        prompt = prompt[0]
    return [_check_prompt(prompt, "prompt")], False


def _merged_config_dict(body: dict[str, Any]) -> dict[str, Any]:
    nested = body.get("generate_config", body.get("generation_config"))
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise InvalidRequest(
            f"generate_config must be an object, got {type(nested).__name__}", ErrorCode.GENERATE_CONFIG_FORMAT_ERROR
        )
    unknown = sorted(
        set(nested) - _CONFIG_FIELDS - set(_CONFIG_ALIASES) - _IGNORED_CONFIG_FIELDS - _UNSUPPORTED_CONFIG_FIELDS
    )
    if unknown:
        raise InvalidRequest(
            f"generate_config has unknown field(s) {unknown}; accepted: {sorted(_CONFIG_FIELDS)}",
            ErrorCode.GENERATE_CONFIG_FORMAT_ERROR,
        )
    unsupported = sorted(k for k in _UNSUPPORTED_CONFIG_FIELDS if nested.get(k) or body.get(k))
    if unsupported:
        raise InvalidRequest(
            f"{unsupported} not supported by rtp-mm (they would change the answer)",
            ErrorCode.GENERATE_CONFIG_FORMAT_ERROR,
        )
    merged = {k: v for k, v in nested.items() if k not in _UNSUPPORTED_CONFIG_FIELDS}
    merged.update({k: v for k, v in body.items() if k in _CONFIG_FIELDS or k in _CONFIG_ALIASES})
    for alias, canonical in _CONFIG_ALIASES.items():
        if alias in merged:
            value = merged.pop(alias)
            merged.setdefault(canonical, value)
    return merged


def parse_native_request(body: dict[str, Any]) -> NativeRequest:
    """Parse and validate a ``POST /`` body; raises InvalidRequest subclasses carrying RTP-LLM's error codes."""
    prompts, batched = _parse_prompts(body)
    merged = _merged_config_dict(body)
    # yield_generator is no GenerateConfig field: the merged dict holds it only when the nested config had it.
    stream = _bool_field(body, "yield_generator") or _bool_field(merged, "yield_generator")
    stream = stream or _bool_field(body, "stream")
    config = GenerateConfig.from_dict(merged)
    if config.return_incremental and not stream:
        raise InvalidRequest("request is non_stream but use incremental decoder")
    images = body.get("images", body.get("urls"))
    if images is None:
        images = []
    if not isinstance(images, list):
        raise InvalidRequest("input images should be list")
    if batched and images:
        # One list of images per prompt of the batch.
        if len(images) != len(prompts) or not all(isinstance(group, list) for group in images):
            raise InvalidRequest(f"images must be a list of {len(prompts)} lists, one per prompt of prompt_batch")
    total = len(prompts) * max(config.num_return_sequences, 1)
    if total > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidRequest(
            f"{len(prompts)} prompts x {max(config.num_return_sequences, 1)} sequences = {total} exceeds the "
            f"{MAX_SEQUENCES_PER_REQUEST} sequences one request may ask for"
        )
    return NativeRequest(prompts=prompts, batched=batched, config=config, stream=stream, images=images)


def native_image_groups(native: NativeRequest, images: list[Any]) -> list[list[Any]]:
    """The decoded ``images`` (prompt-major, as ``native_image_refs`` listed them) split into one list per prompt."""
    if not native.batched:
        return [list(images)]
    groups, start = [], 0
    for group in native.images:
        groups.append(list(images[start : start + len(group)]))
        start += len(group)
    return groups


def native_image_refs(native: NativeRequest) -> list[Any]:
    """Every image reference of the request, prompt-major (a batch holds one list per prompt)."""
    if native.batched:
        return [ref for group in native.images for ref in group]
    return list(native.images)


def check_images(num_images: int, model_type: ModelTypeInfo, has_encoder: bool = False) -> None:
    """Images are accepted only by a model whose vision encoder is loaded (``has_encoder``).

    Called after the images were loaded and decoded, so a bad image is reported as such on any model."""
    if not num_images or has_encoder:
        return
    if model_type.vision:
        raise NotImplementedYetError(
            f"MODEL_TYPE={model_type.name}: the vision encoder is not implemented yet, so images cannot be served",
            ErrorCode.UNSUPPORTED_OPERATION,
        )
    raise InvalidRequest(f"MODEL_TYPE={model_type.name} is a text-only model: 'images' are not accepted")


@dataclass
class SequenceView:
    """What the client sees of one sequence: the text to send (cumulative, or the delta when incremental)."""

    text: str = ""
    finished: bool = False
    aux_info: dict[str, Any] = field(default_factory=dict)


def response_body(native: NativeRequest, views: list[list[SequenceView]]) -> dict[str, Any]:
    """The JSON body (or stream event) for ``views[prompt][sequence]``."""
    multi = native.config.num_return_sequences > 0
    groups = []
    for seqs in views:
        if multi:
            groups.append(
                {
                    "response": [v.text for v in seqs],
                    "finished": all(v.finished for v in seqs),
                    "aux_info": [v.aux_info for v in seqs],
                }
            )
        else:
            groups.append({"response": seqs[0].text, "finished": seqs[0].finished, "aux_info": seqs[0].aux_info})
    return {"response_batch": groups} if native.batched else groups[0]


def dumps(body: Any) -> str:
    # Non-ASCII text stays readable on the wire, as in RTP-LLM.
    return json.dumps(body, ensure_ascii=False)


def stream_event(body: Any) -> bytes:
    return b"data:" + dumps(body).encode() + b"\r\n\r\n"


def tokenizer_encode_body(body: dict[str, Any]) -> str:
    """The prompt of ``POST /tokenizer/encode``."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
    return prompt
