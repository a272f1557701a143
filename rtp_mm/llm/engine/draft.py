"""The draft-model proposer (SP_TYPE=vanilla): a small model with the target's vocabulary, run on the engine thread
on the same paged-cache machinery as the target (its own ``ModelRunner`` and ``BlockManager``, batches built as
``ScheduledBatch``es), proposes k tokens per sequence with k of its own forwards.

Per request the draft keeps its own blocks and how many of the request's tokens its KV holds. A round first
catches up on the tokens it has not seen (the whole sequence the first time, then the one or two tokens the last
verification appended) and draws the first proposal from that chunk's last row, then feeds each proposal back,
one batched decode forward per further token. After verification the draft keeps the KV of the accepted
proposals (they were its own inputs) and drops the rest. Proposals are drawn from the same processed distribution
the target samples from (``sampler.masked_logits`` + ``sampling_probs``), which rejection sampling needs as q.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.model_runner import ModelRunner
from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.request import Request
from rtp_mm.llm.engine.sampler import masked_logits, sampling_probs
from rtp_mm.llm.engine.scheduler import SamplingParams, ScheduledBatch, ScheduledSeq


@dataclass
class DraftSeq:
    """The draft's state of one request. Invariant: ``block_table`` covers at least ``num_computed_tokens``."""

    request_id: int
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # the request's first tokens whose draft KV is in the draft cache
    mm_inputs: tuple[Any, ...] = ()  # none: BlockManager reads it only for prefix hashes, which the draft never keeps


@dataclass
class _Drafting:
    """One request's round: what it may propose and what it has drawn so far."""

    req: Request
    sampling: SamplingParams
    k: int
    state: DraftSeq
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)


class DraftModel:
    """Invariant: ``seqs`` holds a state only for requests that ran in the target, each with its blocks allocated
    in ``block_manager`` (released when the request finishes, is preempted or aborted)."""

    def __init__(self, runner: ModelRunner, block_manager: BlockManager):
        self.runner = runner
        self.block_manager = block_manager
        self.seqs: dict[int, DraftSeq] = {}
        self.num_forwards = 0

    def eligible(self, req: Request) -> bool:
        # The draft reads token ids in plain positions: image rows and prefix-LM layouts are the target's alone.
        return req.layout.is_plain and not req.mm_inputs

    def propose(self, candidates: list) -> dict[int, Proposal]:
        rounds = []
        for candidate in candidates:
            req = candidate.req
            state = self.seqs.setdefault(req.request_id, DraftSeq(req.request_id))
            # Positions up to num_tokens + k - 2 are written: the known tokens and all proposals but the last.
            if not self._allocate(state, req.num_tokens + candidate.k - 1):
                self.release(req.request_id)  # the draft cache is full: this request goes without speculation
                continue
            rounds.append(_Drafting(req, candidate.sampling, candidate.k, state))
        if not rounds:
            return {}
        self._step(rounds, [self._catch_up(r) for r in rounds])
        for j in range(1, max(r.k for r in rounds)):
            live = [r for r in rounds if r.k > j]
            self._step(live, [self._feed(r) for r in live])
        return {
            r.req.request_id: Proposal(tuple(r.tokens), None if r.sampling.config.is_greedy() else torch.stack(r.probs))
            for r in rounds
        }

    def _catch_up(self, r: _Drafting) -> ScheduledSeq:
        """The tokens the draft has not computed yet, up to the request's last known token."""
        req, start, end = r.req, r.state.num_computed_tokens, r.req.num_tokens
        assert start < end, "the draft settles to at most the request's known tokens but one"
        return self._seq(r, start, tuple(req.token_slice(start, end)))

    def _feed(self, r: _Drafting) -> ScheduledSeq:
        """The last proposal, fed back to draw the next."""
        return self._seq(r, r.state.num_computed_tokens, (r.tokens[-1],))

    @staticmethod
    def _seq(r: _Drafting, start: int, token_ids: tuple[int, ...]) -> ScheduledSeq:
        return ScheduledSeq(
            request_id=r.req.request_id,
            start=start,
            token_ids=token_ids,
            positions=tuple(r.req.positions_of(start, start + len(token_ids))),
            block_table=tuple(r.state.block_table),
            prompt_len=r.req.num_prompt_tokens,
            sampling=r.sampling,
        )

    def _step(self, rounds: list[_Drafting], seqs: list[ScheduledSeq]) -> None:
        """One draft forward over ``seqs``; each round draws its next proposal from its last row."""
        decodes = tuple(s for s in seqs if s.num_new_tokens == 1)
        prefills = tuple(s for s in seqs if s.num_new_tokens > 1)
        batch = ScheduledBatch(decodes, prefills, (), sum(s.num_new_tokens for s in seqs))
        logits, order = self.runner.forward(batch)
        self.num_forwards += 1
        row_of = {seq.request_id: i for i, seq in enumerate(order)}
        for r, seq in zip(rounds, seqs, strict=True):
            r.state.num_computed_tokens = seq.start + seq.num_new_tokens
            params = dataclasses.replace(r.sampling, num_output_tokens=r.sampling.num_output_tokens + len(r.tokens))
            row = masked_logits(logits[row_of[seq.request_id]], params)
            if params.config.is_greedy():
                r.tokens.append(int(row.argmax()))
                continue
            q = sampling_probs(row, params.config)
            r.tokens.append(int(torch.multinomial(q.cpu(), 1, generator=params.generator)))
            r.probs.append(q)

    def _allocate(self, state: DraftSeq, num_tokens: int) -> bool:
        bm = self.block_manager
        if bm.blocks_needed(num_tokens) - len(state.block_table) > bm.num_free_blocks:
            return False
        bm.allocate(state, num_tokens)  # type: ignore[arg-type]  # a DraftSeq has what allocation reads
        return True

    def settle(self, req: Request) -> None:
        """After verification: the draft KV of accepted proposals stays (they were its inputs), the rest goes."""
        state = self.seqs.get(req.request_id)
        if state is None:
            return
        state.num_computed_tokens = min(state.num_computed_tokens, req.num_tokens - 1)
        self.block_manager.truncate(state, state.num_computed_tokens)  # type: ignore[arg-type]

    def release(self, request_id: int) -> None:
        state = self.seqs.pop(request_id, None)
        if state is not None:
            self.block_manager.free(state)  # type: ignore[arg-type]

    def keep_only(self, request_ids: set[int]) -> None:
        """Release the states of every request not in ``request_ids`` (finished, aborted or preempted)."""
        for request_id in [i for i in self.seqs if i not in request_ids]:
            self.release(request_id)

    def report(self) -> dict[str, int]:
        bm = self.block_manager
        return {"spec_draft_forwards": self.num_forwards, "spec_draft_blocks_in_use": bm.num_used_blocks}
