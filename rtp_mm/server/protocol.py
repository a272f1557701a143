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

``calculate_loss`` adds ``"loss"`` (1: exp of the mean cross-entropy over the prompt's tokens, i.e. the perplexity,
as RTP-LLM computes it although its docs say "sum"; 2: the per-token list, one entry per prompt token after the first)
and ``return_logits`` adds ``"logits"`` (the raw logits that produced the last generated token, at ``select_tokens_id``
plus the ids of ``select_tokens_str``, as one row ``[[...]]``) to the one-sequence shape; with ``num_return_sequences``
neither is returned, as in RTP-LLM.

Deviations: a message list under ``prompt``/``messages`` (RTP-LLM's "chatapi" format) is refused with 507 until the
chat renderer exists; token-id prompts are not accepted here (the offline API takes them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, create_model

from rtp_mm.api import GenerateConfig
from rtp_mm.errors import EmptyPromptError, ErrorCode, InvalidRequest, NotImplementedYetError
from rtp_mm.model_types import ModelTypeInfo
from rtp_mm.server.wire import validated
from rtp_mm.validation import FieldError

# One HTTP request may fan out into prompts x sequences engine requests; this bounds the fan-out so a single body
# cannot make the server build millions of requests (each sequence also counts against CONCURRENCY_LIMIT).
MAX_SEQUENCES_PER_REQUEST = 1024

STREAM_DONE = b"data:[done]\r\n\r\n"

# RTP-LLM's aliases, applied only when the canonical name is absent.
_CONFIG_ALIASES = {"gen_length": "max_new_tokens", "output_logits": "return_logits"}
# RTP-LLM's validate() answers these with 507 (ERROR_INPUT_FORMAT_ERROR), not 516 like other generate_config fields.
_INPUT_FORMAT_FIELDS = ("calculate_loss",)
# Unknown-fields policy. RTP-LLM GenerateConfig fields that do not change the generated text are accepted and
# ignored; those that would change the answer are refused (516) when set, rather than silently not honoured; any
# other name inside generate_config is a typo, refused with 516. Top-level keys that are no GenerateConfig field are
# ignored, as RTP-LLM does (clients put request ids and the like there).
_IGNORED_CONFIG_FIELDS = (
    "is_streaming",
    "request_format",
    "chat_id",
    "task_id",
    "md5_value",
    "custom_prop",
    "using_hf_sampling",
    "pad_token_id",
    "bos_token_id",
)
# GenerateConfig fields whose results only the OpenAI shapes can carry: refused here rather than computed and dropped.
_OPENAI_ONLY_FIELDS = ("logprobs", "prompt_logprobs")
_UNSUPPORTED_CONFIG_FIELDS = (
    "return_hidden_states",
    "output_hidden_states",
    "return_input_ids",
    "output_input_ids",
    "return_output_ids",
    "bad_words_list",
    "top_p_decay",
    "top_p_min",
    "top_p_reset_ids",
    "no_repeat_ngram_size",
)


# ---- the wire models (``/openapi.json`` is generated from them) ----------------------------------------------------
def _config_fields() -> dict[str, Any]:
    """Every GenerateConfig field, optional, with the type and range GenerateConfig declares (declared once)."""
    hints = get_type_hints(GenerateConfig, include_extras=True)
    fields = {f.name: (Optional[hints[f.name]], None) for f in dataclasses.fields(GenerateConfig)}  # noqa: UP045
    fields.update({alias: fields[name] for alias, name in _CONFIG_ALIASES.items()})
    # RTP-LLM: one LoRA adapter for every prompt, or a list aligned with prompt_batch (NativeRequest.prompt_configs);
    # null or "" is the base model
    fields["adapter_name"] = (Optional[StrictStr | list[StrictStr | None]], None)  # noqa: UP045
    return fields


_CONFIG_FIELDS = _config_fields()
_UNSUPPORTED = {name: (Any, Field(None, description="refused when set (516)")) for name in _UNSUPPORTED_CONFIG_FIELDS}

NativeGenerateConfig = create_model(
    "NativeGenerateConfig",
    __config__=ConfigDict(extra="forbid"),
    __doc__="RTP-LLM's generate_config: GenerateConfig's fields, RTP-LLM's ignored fields and ``gen_length``.",
    yield_generator=(Optional[StrictBool], None),  # noqa: UP045
    **_CONFIG_FIELDS,
    **{name: (Any, Field(None, description="accepted and ignored")) for name in _IGNORED_CONFIG_FIELDS},
    **_UNSUPPORTED,
)

_Prompt = Optional[str | list[str] | list[dict[str, Any]]]  # noqa: UP045 - a message list is refused by name
_Images = Optional[list[str] | list[list[str]]]  # noqa: UP045

NativeRequestBody = create_model(
    "NativeRequestBody",
    __config__=ConfigDict(extra="allow"),
    __doc__="The body of ``POST /``: RTP-LLM's request. Any GenerateConfig field may also be given at the top level, "
    "where it wins over generate_config.",
    prompt=(_Prompt, None),
    text=(_Prompt, Field(None, description="alias of prompt")),
    prompt_batch=(Optional[list[str]], Field(None, min_length=1)),  # noqa: UP045
    messages=(Any, Field(None, description="chat format: not supported on this route (507)")),
    generate_config=(Optional[NativeGenerateConfig], None),  # noqa: UP045
    generation_config=(Optional[NativeGenerateConfig], Field(None, description="alias of generate_config")),  # noqa: UP045
    yield_generator=(Optional[StrictBool], None),  # noqa: UP045
    stream=(Optional[StrictBool], None),  # noqa: UP045
    images=(_Images, Field(None, description="image references; one list per prompt with prompt_batch")),
    urls=(_Images, Field(None, description="alias of images")),
    **_CONFIG_FIELDS,
    **_UNSUPPORTED,
)


class TokenizerEncodeBody(BaseModel):
    """The body of ``POST /tokenizer/encode``."""

    prompt: str


# ---- parsing ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NativeRequest:
    """A parsed ``POST /`` body. Invariants: ``prompts`` is non-empty and holds non-empty strings; ``config`` is
    validated; ``return_incremental`` implies ``stream``."""

    prompts: list[str]
    batched: bool  # prompt_batch was given: answer {"response_batch": [...]}
    config: GenerateConfig
    stream: bool
    images: list[Any] = field(default_factory=list)
    adapter_names: list[str | None] | None = None  # adapter_name given as a list: one per prompt

    @property
    def num_sequences(self) -> int:
        """Sequences per prompt: num_return_sequences, or 1 when that is 0 (off)."""
        return max(self.config.num_return_sequences, 1)

    @property
    def total_sequences(self) -> int:
        return len(self.prompts) * self.num_sequences

    def sequence_configs(self) -> list[GenerateConfig]:
        """The config of each of the ``num_sequences`` samples of one prompt.

        A fixed ``random_seed`` would make the n samples identical, so sample j uses ``random_seed + j``; sample 0
        therefore equals a plain request with the same seed.
        """
        seed = self.config.random_seed
        if seed is None or self.num_sequences == 1:
            return [self.config] * self.num_sequences
        return [self.config.updated(random_seed=seed + j) for j in range(self.num_sequences)]

    def prompt_configs(self, index: int) -> list[GenerateConfig]:
        """``sequence_configs`` of prompt ``index``: with its own adapter when adapter_name was a list."""
        configs = self.sequence_configs()
        if self.adapter_names is None:
            return configs
        return [config.updated(adapter_name=self.adapter_names[index]) for config in configs]


def native_error(error: FieldError) -> InvalidRequest:
    """RTP-LLM's codes: a generate_config field (nested or at the top level) is 516, anything else 507."""
    config_names = {"generate_config", "generation_config", *_CONFIG_FIELDS, *_UNSUPPORTED_CONFIG_FIELDS}
    code = ErrorCode.GENERATE_CONFIG_FORMAT_ERROR if error.loc[:1] and error.loc[0] in config_names else None
    if any(name in error.loc[:2] for name in _INPUT_FORMAT_FIELDS):
        code = ErrorCode.INPUT_FORMAT_ERROR
    return InvalidRequest(error.message, code)


def _check_prompt(prompt: str | list, name: str) -> str:
    if isinstance(prompt, list):  # list[dict]: the prompt validated as a message list
        raise InvalidRequest(f"{name} is a message list (chat format); the native route takes a string for now")
    if not prompt:
        raise EmptyPromptError(f"{name} is an empty string")
    return prompt


def _parse_prompts(body: BaseModel) -> tuple[list[str], bool]:
    if body.messages is not None:
        raise InvalidRequest("'messages' (chat format) is not supported on the native route yet; send 'prompt'")
    if body.prompt_batch is not None:
        return [_check_prompt(p, f"prompt_batch[{i}]") for i, p in enumerate(body.prompt_batch)], True
    prompt = body.prompt if body.prompt is not None else body.text
    if prompt is None:
        raise InvalidRequest("no prompt: give 'prompt' (or 'text') or 'prompt_batch'", ErrorCode.NO_PROMPT_ERROR)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        # RTP-LLM accepts a list under 'prompt' but answers only its first element.
        prompt = prompt[0]
    return [_check_prompt(prompt, "prompt")], False


def _merged_config(body: BaseModel) -> tuple[dict[str, Any], bool]:
    """(GenerateConfig fields: the nested config overridden by top-level fields, yield_generator of the nested)."""
    nested_model = body.generate_config if body.generate_config is not None else body.generation_config
    nested = nested_model.model_dump(exclude_unset=True) if nested_model is not None else {}
    top = body.model_dump(exclude_unset=True, include=set(_CONFIG_FIELDS) | set(_UNSUPPORTED_CONFIG_FIELDS))
    unsupported = sorted(k for k in _UNSUPPORTED_CONFIG_FIELDS if nested.get(k) or top.get(k))
    if unsupported:
        raise InvalidRequest(
            f"{unsupported} not supported by rtp-mm (they would change the answer)",
            ErrorCode.GENERATE_CONFIG_FORMAT_ERROR,
        )
    merged = {k: v for k, v in nested.items() if k in _CONFIG_FIELDS}
    merged.update({k: v for k, v in top.items() if k in _CONFIG_FIELDS})
    for alias, canonical in _CONFIG_ALIASES.items():
        if alias in merged:
            value = merged.pop(alias)
            merged.setdefault(canonical, value)
    return merged, bool(nested.get("yield_generator"))


def parse_native_request(data: Any) -> NativeRequest:
    """Parse and validate a ``POST /`` body; raises InvalidRequest subclasses carrying RTP-LLM's error codes."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    body = validated(NativeRequestBody, data, native_error)
    prompts, batched = _parse_prompts(body)
    merged, nested_stream = _merged_config(body)
    stream = bool(body.yield_generator or nested_stream or body.stream)
    openai_only = sorted(k for k in _OPENAI_ONLY_FIELDS if merged.get(k) is not None)
    if openai_only:  # accepted by GenerateConfig, but RTP-LLM's response has no place for them
        raise InvalidRequest(
            f"{openai_only} are returned on the OpenAI routes only (/v1/completions, /v1/chat/completions); the "
            "native response has no field for them (use calculate_loss or return_logits here)",
            ErrorCode.GENERATE_CONFIG_FORMAT_ERROR,
        )
    adapter_names = merged.pop("adapter_name") if isinstance(merged.get("adapter_name"), list) else None
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise InvalidRequest(
            f"adapter_name is not alignment: {len(adapter_names)} names for {len(prompts)} prompts (a name, or a "
            "list with one name per prompt of prompt_batch)"
        )
    config = GenerateConfig.from_dict(merged)
    if config.return_incremental and not stream:
        raise InvalidRequest("request is non_stream but use incremental decoder")
    images = body.images if body.images is not None else (body.urls or [])
    if images and (batched != isinstance(images[0], list)):
        shape = f"a list of {len(prompts)} lists, one per prompt of prompt_batch" if batched else "a list of strings"
        raise InvalidRequest(f"images must be {shape}")
    if batched and images and len(images) != len(prompts):
        raise InvalidRequest(f"images must be a list of {len(prompts)} lists, one per prompt of prompt_batch")
    native = NativeRequest(prompts, batched, config, stream, images, adapter_names)
    if native.total_sequences > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidRequest(
            f"{len(prompts)} prompts x {native.num_sequences} sequences = {native.total_sequences} exceeds the "
            f"{MAX_SEQUENCES_PER_REQUEST} sequences one request may ask for"
        )
    return native


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
    loss: float | list[float] | None = None  # calculate_loss
    logits: list[float] | None = None  # return_logits: the last token's (selected) logits


def sequence_view(text: str, out: Any) -> SequenceView:
    """The view of one engine output (``text`` is its cumulative text, or the delta when incremental)."""
    return SequenceView(text, out.finished, out.aux_info, out.loss, out.logits)


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
            view = seqs[0]
            group = {"response": view.text, "finished": view.finished, "aux_info": view.aux_info}
            # RTP-LLM's PipelineResponse: "loss" (a float, or the per-token list) and "logits" (one row, [[...]]).
            if view.loss is not None:
                group["loss"] = view.loss
            if view.logits is not None:
                group["logits"] = [view.logits]
            groups.append(group)
    return {"response_batch": groups} if native.batched else groups[0]


def dumps(body: Any) -> str:
    # Non-ASCII text stays readable on the wire, as in RTP-LLM.
    return json.dumps(body, ensure_ascii=False)


def stream_event(body: Any) -> bytes:
    return b"data:" + dumps(body).encode() + b"\r\n\r\n"


def tokenizer_encode_body(data: Any) -> str:
    """The prompt of ``POST /tokenizer/encode``."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return validated(TokenizerEncodeBody, data, native_error).prompt
