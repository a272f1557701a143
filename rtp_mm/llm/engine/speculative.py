"""Speculative decoding's engine hooks: proposals before the step's forward, bookkeeping after its tokens.

``LLMEngine.step`` calls ``propose`` on the scheduled batch: each sampled sequence of an eligible request gets up to
k = GEN_NUM_PER_CIRCLE proposed tokens (a draft model's, ``draft.py``, or prompt lookup's, ``prompt_lookup.py``)
appended to its chunk, KV blocks for them and a ``Proposal``, within the step's token budget and the request's
length limit. The runner computes logits at every row from the last known token on and ``rejection.verify`` turns
them into 1 to k + 1 emitted tokens per sequence; the engine appends them one by one with the usual stop conditions
(a stop inside the run truncates it). ``settle`` then marks the accepted proposals' KV as computed, releases the
blocks that held only rejected proposals, lets the draft drop its rejected KV, counts proposals and acceptances,
and merges a request's per-token outputs of the step into one.

Not speculated (plain one-token steps, documented in the README): requests with a grammar (structured outputs),
``logit_bias`` or a repetition / presence / frequency penalty, whose processed distribution depends on the tokens
before each row; with a draft model also prompts with images or a prefix-LM layout, which the draft cannot read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, NamedTuple, Protocol

from rtp_mm.errors import ConfigError
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.draft import DraftModel
from rtp_mm.llm.engine.model_runner import ModelRunner, StepOutput
from rtp_mm.llm.engine.prompt_lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup
from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.request import Request, RequestStatus
from rtp_mm.llm.engine.scheduler import SamplingParams, ScheduledBatch, ScheduledSeq, Scheduler

logger = logging.getLogger(__name__)


class Candidate(NamedTuple):
    """A sampled sequence that may get a proposal of at most ``k`` tokens this step."""

    req: Request
    sampling: SamplingParams
    k: int


class Proposer(Protocol):
    """What the speculator needs of a proposer (``DraftModel``, ``PromptLookup``)."""

    def eligible(self, req: Request) -> bool: ...
    def propose(self, candidates: list[Candidate]) -> dict[int, Proposal]: ...
    def settle(self, req: Request) -> None: ...  # after verification, for a request still running
    def release(self, request_id: int) -> None: ...
    def keep_only(self, request_ids: set[int]) -> None: ...
    def report(self) -> dict[str, int]: ...


def speculates(req: Request) -> bool:
    """Whether a request's distribution at a row depends only on its logits there and the count of tokens before
    it (EOS mask): then one forward verifies several proposed rows."""
    cfg = req.config
    return (
        req.grammar is None
        and not cfg.logit_bias
        and cfg.repetition_penalty == 1.0
        and not cfg.presence_penalty
        and not cfg.frequency_penalty
    )


class Speculator:
    """Invariants between steps: no running request holds a block beyond those its known tokens need (the blocks
    of rejected proposals are released in ``settle``), its ``num_computed_tokens`` counts only tokens it knows, and
    ``num_accepted <= num_proposed``."""

    def __init__(self, proposer: Proposer, num_proposed: int, scheduler: Scheduler, sp_type: str):
        self.proposer = proposer
        self.k = num_proposed  # GEN_NUM_PER_CIRCLE
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.sp_type = sp_type
        self.num_proposed = 0
        self.num_accepted = 0
        self.num_verified = 0  # sequences verified (one per request per step with a proposal)
        self._step_requests: dict[int, Request] = {}  # requests with a proposal in the current step
        self._candidates: list[Candidate] = []  # requests the proposer drafted for in the current step

    # ---- before the forward -----------------------------------------------------------------------------------
    def propose(self, batch: ScheduledBatch, requests: dict[int, Request]) -> ScheduledBatch:
        """``batch`` with proposals appended to its eligible sampled sequences (those moved from decodes to
        prefills: they now compute several tokens)."""
        self.proposer.keep_only({i for i, r in requests.items() if r.status is RequestStatus.RUNNING})
        self._step_requests = {}
        budget = self.scheduler.max_num_batched_tokens - batch.num_tokens
        candidates = []
        for seq in batch.seqs:
            req = requests.get(seq.request_id)
            if seq.sampling is None or req is None or budget <= 0:
                continue
            # The step emits at most k + 1 tokens, and never past the request's length limit.
            k = min(self.k, req.max_total_len - req.num_tokens - 1, budget)
            if k > 0 and speculates(req) and self.proposer.eligible(req):
                candidates.append(Candidate(req, seq.sampling, k))
                budget -= k
        proposals = self.proposer.propose(candidates) if candidates else {}
        self._candidates = candidates
        if not proposals:
            return batch
        seqs = [self._with_proposal(seq, requests, proposals.get(seq.request_id)) for seq in batch.seqs]
        num_decodes = len(batch.decodes)
        moved = tuple(s for s in seqs[:num_decodes] if s.proposal is not None)
        return ScheduledBatch(
            decodes=tuple(s for s in seqs[:num_decodes] if s.proposal is None),
            prefills=tuple(seqs[num_decodes:]) + moved,
            preempted=batch.preempted,
            num_tokens=sum(s.num_new_tokens for s in seqs),
        )

    def _with_proposal(
        self, seq: ScheduledSeq, requests: dict[int, Request], proposal: Proposal | None
    ) -> ScheduledSeq:
        if proposal is None:
            return seq
        req = requests[seq.request_id]
        bm = self.block_manager
        # Proposals take free blocks only, never a preemption: cut the proposal to what fits.
        room = (len(req.block_table) + bm.num_free_blocks) * bm.block_size - req.num_tokens
        if room < len(proposal):
            probs = proposal.draft_probs
            proposal = Proposal(proposal.token_ids[:room], None if probs is None else probs[:room])
        if not len(proposal):
            return seq
        end = req.num_tokens + len(proposal)
        bm.allocate(req, end)
        self._step_requests[req.request_id] = req
        return dataclasses.replace(
            seq,
            token_ids=seq.token_ids + proposal.token_ids,
            positions=seq.positions + tuple(req.positions_of(req.num_tokens, end)),
            block_table=tuple(req.block_table),
            proposal=proposal,
        )

    # ---- after the tokens were appended -----------------------------------------------------------------------
    def settle(
        self, batch: ScheduledBatch, result: StepOutput, outputs: list[Any], requests: dict[int, Request]
    ) -> list[Any]:
        """Bookkeeping of the verified sequences; returns ``outputs`` with each of their requests' outputs of this
        step merged into one (``RequestOutput``s, in order). ``requests``: the engine's, after the step."""
        emitted = Counter(token.request_id for token in result.tokens)
        appended = Counter(out.request_id for out in outputs if out.request_id in self._step_requests)
        for seq in batch.seqs:
            req = self._step_requests.get(seq.request_id)
            if req is None:
                continue
            accepted = emitted[req.request_id] - 1
            self.num_verified += 1
            self.num_proposed += len(seq.proposal)
            self.num_accepted += accepted
            req.num_proposed += len(seq.proposal)
            req.num_accepted += accepted
            req.iter_count -= max(appended[req.request_id] - 1, 0)  # the engine counted one per appended token
            if req.status is RequestStatus.RUNNING:
                # The last known token and the accepted proposals were computed; the token after them was not.
                req.num_computed_tokens = req.num_tokens - 1
                self.block_manager.register_full_blocks(req)
                self.block_manager.truncate(req, req.num_tokens)
        for candidate in self._candidates:  # a proposal cut to nothing still advanced the draft
            if candidate.req.status is RequestStatus.RUNNING:
                self.proposer.settle(candidate.req)
        self._candidates = []
        # Requests that finished this step (inside a verified run or not) leave the draft at once.
        self.proposer.keep_only({i for i, r in requests.items() if r.status is RequestStatus.RUNNING})
        merged = _merge(outputs, self._step_requests)
        self._step_requests = {}
        return merged

    def release(self, request_id: int) -> None:
        """An aborted request: its draft state goes at once."""
        self.proposer.release(request_id)

    # ---- introspection ----------------------------------------------------------------------------------------
    @staticmethod
    def aux_info(req: Request) -> dict[str, int]:
        return {"sp_proposed_len": req.num_proposed, "sp_accepted_len": req.num_accepted}

    def report(self) -> dict[str, Any]:
        rate = self.num_accepted / self.num_proposed if self.num_proposed else 0.0
        return {
            "spec_type": self.sp_type,
            "spec_proposed_tokens": self.num_proposed,
            "spec_accepted_tokens": self.num_accepted,
            "spec_acceptance_rate": rate,
            "spec_verified_seqs": self.num_verified,
        } | self.proposer.report()


def _merge(outputs: list[Any], requests: dict[int, Request]) -> list[Any]:
    """One output per request of ``requests``: the last of its outputs (cumulative fields), with every delta text
    and new-token count of the step, and its aux_info's iteration and speculation counts brought up to date."""
    if not requests:
        return outputs
    groups: dict[int, list[Any]] = {}
    for out in outputs:
        if out.request_id in requests:
            groups.setdefault(out.request_id, []).append(out)
    merged, done = [], set()
    for out in outputs:
        if out.request_id not in groups:
            merged.append(out)
        elif out.request_id not in done:
            done.add(out.request_id)
            group, req = groups[out.request_id], requests[out.request_id]
            last = group[-1]
            aux = last.aux_info | {"iter_count": req.iter_count} | Speculator.aux_info(req)
            merged.append(
                dataclasses.replace(
                    last,
                    delta_text="".join(o.delta_text for o in group),
                    num_new_tokens=sum(o.num_new_tokens for o in group),
                    aux_info=aux,
                )
            )
    return merged


def build_speculator(
    sp_type: str | None,
    gen_num_per_circle: int,
    scheduler: Scheduler,
    vocab_size: int,
    draft_runner: ModelRunner | None = None,
    ngram: tuple[int, int] = (MIN_NGRAM, MAX_NGRAM),
) -> Speculator | None:
    """The engine's speculator for SP_TYPE ``sp_type`` (None: no speculation): ``vanilla`` with ``draft_runner``, the
    draft model's runner, which gets a block manager of its own with as many blocks as the target's (so it can
    always follow), or ``prompt_lookup`` matching n-grams of ``ngram`` = (shortest, longest) tokens."""
    if sp_type is None:
        return None
    if draft_runner is not None:
        draft_vocab = draft_runner.model.spec.vocab_size
        if draft_vocab != vocab_size:
            raise ConfigError(
                f"the draft model (SP_CHECKPOINT_PATH) has a vocabulary of {draft_vocab} tokens and the target model "
                f"{vocab_size}: speculative decoding needs one vocabulary; accepted: a draft of the target's family"
            )
        proposer: Proposer = DraftModel(draft_runner, BlockManager(draft_runner.num_blocks, draft_runner.block_size))
    else:
        proposer = PromptLookup(vocab_size, min_ngram=ngram[0], max_ngram=ngram[1])
    logger.info("speculative decoding: %s, up to %d proposed tokens per step", sp_type, gen_num_per_circle)
    return Speculator(proposer, gen_num_per_circle, scheduler, sp_type)
