"""What a caller submits (``EngineRequest``) and what the engine tracks per admitted sequence (``Request``).

An ``EngineRequest`` is immutable and carries the prompt in the caller's terms (token ids, or text / a chat that the
engine's prompt processor turns into ids), preprocessed images and the generation config. The engine turns it into a
``Request`` on its own thread once the prompt is tokenized, its images are encoded and it passed validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.multimodal import EncoderInput, MultimodalInput
from rtp_mm.llm.models.prompt_layout import PromptLayout


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate, as submitted. ``images`` fill the prompt's image placeholders in order."""

    request_id: int
    prompt: Any  # token ids (used as given), or what the engine's prompt processor reads (text, chat messages)
    config: GenerateConfig
    images: tuple[EncoderInput, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)


class RequestStatus(Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # admitted; holds KV blocks for num_computed_tokens (+ this step's tokens)
    FINISHED = "finished"


@dataclass
class Request:
    """One admitted sequence. Invariants: ``num_computed_tokens <= len(all_token_ids)``; the block table covers every
    computed token; only the scheduler mutates the scheduling fields, only the engine appends outputs."""

    request_id: int
    prompt_ids: list[int]
    config: GenerateConfig
    max_total_len: int  # prompt + generated tokens may not exceed this (min of MAX_SEQ_LEN and prompt+max_new)
    eos_token_ids: frozenset[int] = frozenset()
    mm_inputs: tuple[MultimodalInput, ...] = ()
    layout: PromptLayout = PromptLayout()  # rotary positions and bidirectional prefix of the prompt
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None
    reuse_len: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    iter_count: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    generator: torch.Generator | None = None  # per-request RNG: seeded samples independent of batch composition
    grammar: Any = None  # structured outputs: a TokenMatcher that has consumed exactly output_ids
    # Prompt logits (config.prompt_logprobs, calculate_loss): entry i is the logprob of prompt token i given the
    # tokens before it (plus the top-N); entry 0 is None. Filled chunk by chunk in the prefill, complete at its end.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    loss: float | list[float] | None = None  # calculate_loss's result, once the prompt logprobs are complete
    select_token_ids: tuple[int, ...] = ()  # return_logits: the vocabulary ids to return (all when empty)
    last_logits: list[float] | None = None  # return_logits: the raw logits that produced the last token
    adapter: Any = None  # the LoRA adapter (llm/lora LoraAdapter) chosen at admission, kept to the end; None: base
    num_proposed: int = 0  # speculative decoding: tokens proposed for this request, and how many the target kept
    num_accepted: int = 0

    @property
    def needs_prompt_logits(self) -> bool:
        """Its prefill must compute the logits of every prompt position (so it may not reuse cached prefix blocks)."""
        return self.prompt_logprobs is not None

    @property
    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(self.prompt_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without copying the whole sequence (a decode step reads one token)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:p] + self.output_ids[max(start - p, 0) : end - p]

    def positions_of(self, start: int, end: int) -> list[Any]:
        """Rotary positions of sequence indices [start, end), prompt or generated."""
        return self.layout.positions_of(start, end, self.num_prompt_tokens)
