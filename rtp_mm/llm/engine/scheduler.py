"""Scheduler: continuous batching over the paged KV cache (pure Python).

Each step: running requests first (decodes, then the next chunk of partially prefilled prompts), preempting the
most recently admitted request (recompute: its blocks are freed and it returns to the front of the queue) when
blocks run out; then new requests from the queue while the token budget, the sequence limit and the free blocks
allow. Long prompts are prefilled in chunks of at most the remaining budget. The runner receives one frozen
``ScheduledBatch``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request  # read-only for the runner (token ids, sampling parameters, RNG)
    start: int  # position of the first token computed this step (= num_computed_tokens when scheduled)
    num_new_tokens: int  # tokens computed this step
    block_table: tuple[int, ...]  # blocks covering positions [0, start + num_new_tokens)
    sample: bool  # the chunk reaches the last known token: a new token is sampled from its last position


@dataclass(frozen=True)
class ScheduledBatch:
    decodes: tuple[ScheduledSeq, ...]  # one token each; batched attention over their block tables
    prefills: tuple[ScheduledSeq, ...]  # prompt chunks (or recomputation after preemption)
    preempted: tuple[Request, ...]  # requests sent back to the queue this step
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
        preempted: list[Request] = []

        def emit(req: Request, num_new: int) -> None:
            seq = ScheduledSeq(
                request=req,
                start=req.num_computed_tokens,
                num_new_tokens=num_new,
                block_table=tuple(req.block_table),
                sample=req.num_computed_tokens + num_new == req.num_tokens,
            )
            (decodes if num_new == 1 else prefills).append(seq)

        # 1) Running requests, oldest first. Preempt from the newest end when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            need = bm.blocks_needed(req.num_computed_tokens + num_new) - len(req.block_table)
            while need > bm.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
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
            reuse = bm.lookup_prefix(req)
            computed = len(reuse) * bm.block_size
            num_new = min(req.num_tokens - computed, budget)
            if req.bidirectional_len and computed + num_new < req.num_prompt_tokens:
                break  # a prefix-LM prompt is prefilled in one chunk (engine caps it at the budget): wait for room
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

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens are now in the KV cache (before sampled tokens are appended)."""
        for seq in batch.seqs:
            req = seq.request
            if req.status is RequestStatus.RUNNING:
                req.num_computed_tokens = seq.start + seq.num_new_tokens
                self.block_manager.register_full_blocks(req)
