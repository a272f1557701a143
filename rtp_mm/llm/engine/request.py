"""Request: everything the engine knows about one sequence."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from rtp_mm.llm.engine.generate_config import GenerateConfig


class RequestStatus(Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # admitted; holds KV blocks for num_computed_tokens (+ this step's tokens)
    FINISHED = "finished"


@dataclass
class MultimodalInput:
    """Precomputed embeddings spliced into the token embeddings (llm never runs a vision tower itself)."""

    embeds: torch.Tensor  # [num_rows, hidden]
    offset: int  # index in the prompt of the first row
    content_hash: str = ""  # identity of the image, for prefix-cache keys


@dataclass
class Request:
    """One sequence. Invariants: ``num_computed_tokens <= len(all_token_ids)``; the block table covers every
    computed token; only the scheduler mutates the scheduling fields, only the engine appends outputs."""

    request_id: int
    prompt_ids: list[int]
    config: GenerateConfig
    max_total_len: int  # prompt + generated tokens may not exceed this (min of MAX_SEQ_LEN and prompt+max_new)
    eos_token_ids: frozenset[int] = frozenset()
    mm_inputs: list[MultimodalInput] = field(default_factory=list)
    # Explicit rotary positions of the prompt tokens (chatglm4v's image rule); None = 0..n-1 (see vision/base.py).
    positions: list[int] | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None
    reuse_len: int = 0  # prompt tokens served from the prefix cache
    # Prefix-LM (GLM v1/130B): every prompt token sees the keys below this index, so the K/V of early prompt tokens
    # depend on later ones. The scheduler prefills such a prompt in one chunk, and the prefix cache keys its blocks
    # on this whole bidirectional part. 0 = causal.
    bidirectional_len: int = 0
    num_preemptions: int = 0
    iter_count: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    generator: torch.Generator | None = None  # per-request RNG: seeded samples independent of batch composition
    user_data: Any = None  # owner's handle (e.g. the output queue); the engine never looks inside

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

    def positions_of(self, start: int, end: int) -> list[int]:
        """Explicit rotary positions of sequence indices [start, end): prompt tokens take ``positions``, generated
        tokens continue from the last prompt position + 1. Requires ``positions`` (None means plain indices)."""
        assert self.positions is not None
        n = len(self.positions)
        head = self.positions[start : min(end, n)]
        last = self.positions[-1]
        return head + [last + 1 + t - n for t in range(max(start, n), end)]
