"""Scheduler: continuous batching over the paged KV cache (pure Python).

Each step: running requests first (decodes, then the next chunk of partially prefilled prompts), preempting the
most recently admitted request (recompute: its blocks are freed and it returns to the front of the queue) when
blocks run out; then new requests from the queue while the token budget, the sequence limit and the free blocks
allow. Long prompts are prefilled in chunks of at most the remaining budget.

The runner receives one frozen ``ScheduledBatch`` holding plain values (token ids, positions, block tables, image
rows, sampling parameters), never a live ``Request``: what a step computes is fixed when it is scheduled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.multimodal import MultimodalInput
from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.request import Request, RequestStatus
from rtp_mm.llm.models.prompt_layout import Position


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler needs of one sequence to pick its next token."""

    config: GenerateConfig  # read-only
    eos_token_ids: frozenset[int]
    num_output_tokens: int  # generated so far (EOS is masked until config.min_new_tokens)
    prompt_len: int
    token_ids: tuple[int, ...]  # prompt + output ids when a penalty reads them, else ()
    generator: Any  # the request's torch.Generator: seeded samples independent of batch composition
    grammar: Any = None  # the request's TokenMatcher (structured outputs): its mask is applied before sampling

    @property
    def output_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_len :]


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in a step: tokens [start, start + len(token_ids)) are computed."""

    request_id: int
    start: int  # = num_computed_tokens when scheduled
    token_ids: tuple[int, ...]
    positions: tuple[Position, ...]  # rotary position of each token
    block_table: tuple[int, ...]  # blocks covering positions [0, start + len(token_ids))
    prompt_len: int  # Qwen v1's dynamic NTK depends on it
    bidirectional_len: int = 0  # prompt tokens below this see each other (prefix-LM), see PromptLayout
    mm_inputs: tuple[MultimodalInput, ...] = ()  # image rows overlapping this chunk (the runner slices them)
    sampling: SamplingParams | None = None  # set when the chunk reaches the last known token: sample after it
    # Prompt logprobs: the prompt tokens that rows [start, start + len(prompt_targets)) predict, and the top-N
    # alternatives wanted per row (see Request.prompt_logprobs); () when not wanted or already computed.
    prompt_targets: tuple[int, ...] = ()
    prompt_top_n: int = 0
    logits_select: tuple[int, ...] | None = None  # return_logits: the sampled row's logits at these ids (() = all)
    adapter: Any = None  # the request's LoRA adapter (llm/lora LoraAdapter), None: the base model
    # Speculative decoding: the last len(proposal) of token_ids are proposed, not known; every row from the last
    # known token on is verified (speculative.py). Set only on sampled sequences.
    proposal: Proposal | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sample(self) -> bool:
        return self.sampling is not None


@dataclass(frozen=True)
class ScheduledBatch:
    decodes: tuple[ScheduledSeq, ...]  # one token each; batched attention over their block tables
    prefills: tuple[ScheduledSeq, ...]  # prompt chunks (or recomputation after preemption)
    preempted: tuple[int, ...]  # ids of the requests sent back to the queue this step
    num_tokens: int  # total tokens computed this step

    @property
    def seqs(self) -> tuple[ScheduledSeq, ...]:
        return self.decodes + self.prefills


class Scheduler:
    """Invariants: a request is in exactly one of ``waiting``/``running`` until finished; running requests hold
    blocks for at least ``num_computed_tokens`` tokens; waiting requests hold none."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Keep a few blocks free at admission so running decodes can grow without immediate preemption.
        self.watermark_blocks = (
            watermark_blocks if watermark_blocks is not None else max(1, block_manager.num_blocks // 100)
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # total since start (a metric)
        self._scheduled: list[tuple[Request, int]] = []  # the last batch's (request, tokens computed by it)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Remove ``req`` wherever it is and release its blocks (idempotent)."""
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.block_manager.free(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.block_manager.forget(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        preempted: list[int] = []
        self._scheduled = []

        def emit(req: Request, num_new: int) -> None:
            seq = scheduled_seq(req, req.num_computed_tokens, num_new)
            (decodes if num_new == 1 else prefills).append(seq)
            self._scheduled.append((req, num_new))

        # 1) Running requests, oldest first. Preempt from the newest end when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            need = bm.blocks_needed(req.num_computed_tokens + num_new) - len(req.block_table)
            while need > bm.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            bm.allocate(req, req.num_computed_tokens + num_new)
            emit(req, num_new)
            budget -= num_new
            index += 1

        # 2) Admit queued requests (not in a step that had to preempt: that would only thrash).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            # Cached blocks skip their positions' logits, which prompt logprobs need: such a request computes them.
            reuse = [] if req.needs_prompt_logits else bm.lookup_prefix(req)
            computed = len(reuse) * bm.block_size
            num_new = min(req.num_tokens - computed, budget)
            if req.layout.bidirectional_len and computed + num_new < req.num_prompt_tokens:
                break  # a bidirectional prompt is prefilled in one chunk (admission caps it at the budget): wait
            need = bm.blocks_needed(computed + num_new) - len(reuse)
            if not bm.can_allocate(need + self.watermark_blocks, reuse) and self.running:
                break
            if not bm.can_allocate(need, reuse):
                break
            self.waiting.popleft()
            bm.allocate(req, computed + num_new, reuse)
            req.num_computed_tokens = computed
            if req.num_preemptions == 0:
                req.reuse_len = computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            emit(req, num_new)
            budget -= num_new

        return ScheduledBatch(
            decodes=tuple(decodes),
            prefills=tuple(prefills),
            preempted=tuple(preempted),
            num_tokens=self.max_num_batched_tokens - budget,
        )

    def advance(self) -> None:
        """Record that the last batch's tokens are now in the KV cache (before sampled tokens are appended)."""
        for req, num_new in self._scheduled:
            if req.status is RequestStatus.RUNNING:
                req.num_computed_tokens += num_new
                self.block_manager.register_full_blocks(req)
        self._scheduled = []


def scheduled_seq(req: Request, start: int, num_new: int) -> ScheduledSeq:
    """The frozen work item for tokens [start, start + num_new) of ``req``."""
    end = start + num_new
    sampling = None
    if end == req.num_tokens and req.num_tokens < req.max_total_len:  # max_new_tokens=0: the prefill only
        cfg = req.config
        penalized = cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty
        sampling = SamplingParams(
            config=cfg,
            eos_token_ids=req.eos_token_ids,
            num_output_tokens=len(req.output_ids),
            prompt_len=req.num_prompt_tokens,
            token_ids=tuple(req.all_token_ids) if penalized else (),
            generator=req.generator,
            grammar=req.grammar,
        )
    # Row p predicts prompt token p + 1 (the last prompt row predicts the first generated token).
    prompt_targets: tuple[int, ...] = ()
    if req.prompt_logprobs is not None and len(req.prompt_logprobs) < min(end + 1, req.num_prompt_tokens):
        prompt_targets = tuple(req.prompt_ids[start + 1 : end + 1])
    return ScheduledSeq(
        request_id=req.request_id,
        start=start,
        token_ids=tuple(req.token_slice(start, end)),
        positions=tuple(req.positions_of(start, end)),
        block_table=tuple(req.block_table),
        prompt_len=req.num_prompt_tokens,
        bidirectional_len=req.layout.bidirectional_len if req.layout.bidirectional_len > start else 0,
        mm_inputs=tuple(mm for mm in req.mm_inputs if mm.offset < end and mm.offset + mm.embeds.shape[0] > start),
        sampling=sampling,
        prompt_targets=prompt_targets,
        prompt_top_n=req.config.prompt_logprobs or 0,
        logits_select=req.select_token_ids if req.config.return_logits and sampling is not None else None,
        adapter=req.adapter,
    )
