"""GenerateConfig: RTP-LLM's per-request generation parameters (field names and defaults of its generate_config.py).

Defaults follow RTP-LLM, so the native default decoding is top-p 0.95 sampling; ``top_k=1`` is greedy. ``logprobs``
is rtp-mm's addition (OpenAI-style top-N log-probabilities of the distribution before temperature/top-k/top-p), and so
is ``prompt_logprobs`` (the same for every prompt position, computed in the prefill; OpenAI's ``echo``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from rtp_mm.errors import GenerateConfigError
from rtp_mm.validation import field_errors

MAX_LOGPROBS = 20
# Stop conditions are checked on every decode step of the request, so their number and length are bounded.
MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 256
MAX_STOP_WORD_TOKENS = 64
MAX_LOGIT_BIAS = 300  # as OpenAI
MAX_GRAMMAR_CHARS = 65536  # a regex or Lark grammar (compiled on the engine thread at admission)
MAX_SELECT_TOKENS = 4096  # return_logits: ids of the logits to return
MAX_SELECT_STRINGS = 256  # ... and strings, tokenized on the engine thread at admission

# Strict types: JSON's 2.0 is no integer, true is no number, "42" is no seed. A float field takes integers.
_Int = Annotated[int, Field(strict=True)]
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Bool = Annotated[bool, Field(strict=True)]
_StopWord = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_STOP_WORD_CHARS)]
# JSON object keys are strings: a token id key may be "123" (lax), its bias must be a real number.
_TokenId = Annotated[int, Field(ge=0)]
_Bias = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100.0, le=100.0)]
_TokenIds = Annotated[list[Annotated[_Int, Field(ge=0)]], Field(min_length=1, max_length=MAX_STOP_WORD_TOKENS)]


@dataclass
class GenerateConfig:
    """Per-request generation parameters. Types and ranges are declared once, here, for the offline API and for both
    wire protocols (the server validates request bodies against these annotations); ``validate()`` raises
    GenerateConfigError naming the field."""

    # effective: min(max_new_tokens, max_seq_len - prompt_len); 0 = prefill only (prompt logprobs, loss), no token
    max_new_tokens: Annotated[_Int, Field(ge=0)] = 1000
    min_new_tokens: Annotated[_Int, Field(ge=0)] = 0  # EOS and stop words are ignored until this many tokens exist
    num_beams: Annotated[_Int, Field(ge=1)] = 1  # beam search is not supported (nor in RTP-LLM's C++ engine)
    num_return_sequences: Annotated[_Int, Field(ge=0)] = 0  # 0 = off; > 0 = that many sampled sequences
    top_k: Annotated[_Int, Field(ge=0)] = 0  # 0 disables top-k
    top_p: Annotated[_Float, Field(gt=0.0, le=1.0)] = 0.95
    temperature: Annotated[_Float, Field(ge=0.0, le=100.0)] = 1.0  # 0 means greedy
    repetition_penalty: Annotated[_Float, Field(gt=0.0, le=100.0)] = 1.0
    presence_penalty: Annotated[_Float, Field(ge=-2.0, le=2.0)] = 0.0  # OpenAI semantics, once per seen token
    frequency_penalty: Annotated[_Float, Field(ge=-2.0, le=2.0)] = 0.0  # OpenAI semantics, per occurrence
    # torch.Generator.manual_seed takes at most 64 bits.
    random_seed: Annotated[_Int, Field(ge=0, lt=2**64)] | None = None
    stop_words_str: Annotated[list[_StopWord], Field(max_length=MAX_STOP_WORDS)] = field(default_factory=list)
    stop_words_list: Annotated[list[_TokenIds], Field(max_length=MAX_STOP_WORDS)] = field(default_factory=list)
    print_stop_words: _Bool = False
    eos_token_id: Annotated[_Int, Field(ge=0)] | None = None  # per-request override of the model's EOS
    ignore_eos: _Bool = False
    timeout_ms: _Int = -1  # <= 0 disables it
    return_incremental: _Bool = False
    # top-N logprobs per generated token (plus the chosen token)
    logprobs: Annotated[_Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # top-N logprobs per prompt position (plus the prompt's own token; position 0 has none): OpenAI's echo
    prompt_logprobs: Annotated[_Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # RTP-LLM's: 0 off; 1 exp(mean cross-entropy of the prompt's tokens), i.e. perplexity; 2 the per-token list
    calculate_loss: Annotated[_Int, Field(ge=0, le=2)] = 0
    # RTP-LLM's: the raw logits that produced the last generated token, over select_tokens_* (all when empty)
    return_logits: _Bool = False
    select_tokens_id: Annotated[list[_Int], Field(max_length=MAX_SELECT_TOKENS)] = field(default_factory=list)
    select_tokens_str: Annotated[list[_StopWord], Field(max_length=MAX_SELECT_STRINGS)] = field(default_factory=list)
    adapter_name: Annotated[str, Field(strict=True)] | None = None
    # Added to the logits before sampling (OpenAI's logit_bias): token id -> bias; -100 bans, +100 forces.
    logit_bias: Annotated[dict[_TokenId, _Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # Structured outputs (at most one): the answer matches this JSON schema, regex or Lark grammar (llguidance's).
    json_schema: Annotated[dict[str, Any], Field(strict=True)] | None = None
    regex: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    grammar: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> GenerateConfig:
        """Build from a JSON-like dict. Unknown keys are ignored unless ``strict`` (then they are an error)."""
        if not isinstance(data, dict):
            raise GenerateConfigError(f"generate_config must be an object, got {type(data).__name__}")
        names = field_names()
        unknown = sorted(set(data) - names)
        if strict and unknown:
            raise GenerateConfigError(f"generate_config has unknown fields {unknown}; accepted: {sorted(names)}")
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.validate()
        return config

    def updated(self, **changes: Any) -> GenerateConfig:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def is_greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    def validate(self) -> None:
        """Check every field against its annotation (ints become floats where a float is declared), then the rules
        that span fields."""
        try:
            checked = _ADAPTER.validate_python(dict(self.__dict__))
        except ValidationError as e:
            raise GenerateConfigError(field_errors(e)[0].message) from None
        self.__dict__.update(checked.__dict__)
        if self.num_beams > 1:
            raise GenerateConfigError("num_beams > 1 (beam search) is not supported; use num_return_sequences")
        grammars = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise GenerateConfigError(f"{grammars} are all set; a request takes at most one of them")
        if self.return_logits and self.max_new_tokens == 0:
            raise GenerateConfigError(
                "return_logits returns the logits of the last generated token; max_new_tokens=0 generates none"
            )


def field_names() -> frozenset[str]:
    return _FIELD_NAMES


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GenerateConfig))
_ADAPTER = TypeAdapter(GenerateConfig)
