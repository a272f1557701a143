"""GenerateConfig: RTP-LLM's per-request generation parameters (field names and defaults of its generate_config.py).

Defaults follow RTP-LLM, so the native default decoding is top-p 0.95 sampling; ``top_k=1`` is greedy. ``logprobs``
is rtp-mm's addition (OpenAI-style top-N log-probabilities of the distribution before temperature/top-k/top-p).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rtp_mm.errors import GenerateConfigError

MAX_LOGPROBS = 20


@dataclass
class GenerateConfig:
    """Per-request generation parameters. ``validate()`` raises GenerateConfigError naming the field."""

    max_new_tokens: int = 1000  # effective limit: min(max_new_tokens, max_seq_len - prompt_len)
    min_new_tokens: int = 0  # EOS and stop words are ignored until this many tokens exist
    num_beams: int = 1  # beam search is not supported (RTP-LLM's C++ engine rejects it as well)
    num_return_sequences: int = 0  # 0 = off; > 0 = that many sampled sequences for the prompt
    top_k: int = 0  # 0 disables top-k
    top_p: float = 0.95
    temperature: float = 1.0  # 0 means greedy
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI semantics, subtracted once per seen token
    frequency_penalty: float = 0.0  # OpenAI semantics, subtracted per occurrence
    random_seed: int | None = None
    stop_words_str: list[str] = field(default_factory=list)
    stop_words_list: list[list[int]] = field(default_factory=list)
    print_stop_words: bool = False
    eos_token_id: int | None = None  # per-request override of the model's EOS
    ignore_eos: bool = False
    timeout_ms: int = -1
    return_incremental: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the chosen token)
    adapter_name: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> GenerateConfig:
        """Build from a JSON-like dict. Unknown keys are ignored unless ``strict`` (then they are an error)."""
        if not isinstance(data, dict):
            raise GenerateConfigError(f"generate_config must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
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
        _int(self, "max_new_tokens", minimum=1)
        _int(self, "min_new_tokens", minimum=0)
        _int(self, "num_beams", minimum=1)
        if self.num_beams > 1:
            raise GenerateConfigError("num_beams > 1 (beam search) is not supported; use num_return_sequences")
        _int(self, "num_return_sequences", minimum=0)
        _int(self, "top_k", minimum=0)
        _float(self, "top_p", low=0.0, high=1.0, low_open=True)
        _float(self, "temperature", low=0.0, high=100.0)
        _float(self, "repetition_penalty", low=0.0, high=100.0, low_open=True)
        _float(self, "presence_penalty", low=-2.0, high=2.0)
        _float(self, "frequency_penalty", low=-2.0, high=2.0)
        if self.random_seed is not None:
            _int(self, "random_seed", minimum=0)
            if self.random_seed >= 2**64:  # torch.Generator.manual_seed takes at most 64 bits
                raise GenerateConfigError(f"random_seed={self.random_seed} is too large; accepted: 0..2**64-1")
        if not isinstance(self.stop_words_str, list) or not all(isinstance(s, str) for s in self.stop_words_str):
            raise GenerateConfigError(f"stop_words_str={self.stop_words_str!r} must be a list of strings")
        if any(s == "" for s in self.stop_words_str):
            raise GenerateConfigError("stop_words_str must not contain an empty string")
        if not isinstance(self.stop_words_list, list) or not all(
            isinstance(seq, list) and seq and all(_is_int(t) and t >= 0 for t in seq) for seq in self.stop_words_list
        ):
            raise GenerateConfigError(
                f"stop_words_list={self.stop_words_list!r} must be a list of non-empty lists of token ids"
            )
        for name in ("print_stop_words", "ignore_eos", "return_incremental"):
            if not isinstance(getattr(self, name), bool):
                raise GenerateConfigError(f"{name}={getattr(self, name)!r} must be a boolean")
        if self.eos_token_id is not None:
            _int(self, "eos_token_id", minimum=0)
        if not _is_int(self.timeout_ms):
            raise GenerateConfigError(f"timeout_ms={self.timeout_ms!r} must be an integer (<= 0 disables it)")
        if self.logprobs is not None:
            _int(self, "logprobs", minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise GenerateConfigError(f"logprobs={self.logprobs} is too large; accepted: 0..{MAX_LOGPROBS}")
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise GenerateConfigError(f"adapter_name={self.adapter_name!r} must be a string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(config: GenerateConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not _is_int(value) or value < minimum:
        raise GenerateConfigError(f"{name}={value!r} is invalid; accepted: an integer >= {minimum}")


def _float(config: GenerateConfig, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise GenerateConfigError(f"{name}={value!r} is invalid; accepted: a number")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise GenerateConfigError(f"{name}={value!r} is out of range; accepted: {bracket}{low}, {high}]")
    setattr(config, name, float(value))
