"""LLMEngine: one synchronous step function, ``schedule -> run -> sample -> postprocess``.

Not thread-safe by itself: ``EngineLoop`` drives it from one thread. Postprocessing appends the sampled tokens,
detokenizes incrementally, applies stop conditions (EOS, stop token sequences, stop strings, length, timeout) and
produces one ``RequestOutput`` per request that advanced.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from rtp_mm.errors import (
    EmptyPromptError,
    InvalidRequest,
    PromptTooLongError,
    RequestTimeout,
    RtpMmError,
)
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.detokenizer import IncrementalDetokenizer
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.model_runner import ModelRunner
from rtp_mm.llm.engine.request import MultimodalInput, Request
from rtp_mm.llm.engine.sampler import sample
from rtp_mm.llm.engine.scheduler import Scheduler
from rtp_mm.llm.engine.stop_words import StopStringMatcher, match_stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What a request has produced so far (cumulative text and ids, plus this step's delta)."""

    request_id: int
    text: str
    delta_text: str
    token_ids: list[int]  # generated ids so far (EOS included when it ended the request)
    num_new_tokens: int
    finished: bool
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    aux_info: dict[str, Any]
    error: RtpMmError | None = None


@dataclass
class _TextState:
    """Per-request text machinery (lives in the engine; the Request stays tokenizer-free)."""

    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher | None
    text: str = ""


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        max_seq_len: int,
        tokenizer: Any | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.requests: dict[int, Request] = {}
        self._text: dict[int, _TextState] = {}
        self._ids = itertools.count(1)
        self.step_count = 0
        self.last_step_ms = 0.0

    # ---- admission --------------------------------------------------------------------------------------------
    def make_request(
        self,
        prompt_ids: list[int],
        config: GenerateConfig,
        mm_inputs: list[MultimodalInput] | None = None,
        request_id: int | None = None,
        positions: list[int] | None = None,
    ) -> Request:
        """Validate and build a Request (does not enqueue it). Raises InvalidRequest subclasses. ``positions``:
        explicit rotary positions of the prompt tokens (vision/base.py PreparedPrompt)."""
        if not prompt_ids:
            raise EmptyPromptError("prompt is empty: at least one token is needed")
        config.validate()
        prompt_len = len(prompt_ids)
        if prompt_len >= self.max_seq_len:
            raise PromptTooLongError(
                f"prompt length {prompt_len} >= max_seq_len {self.max_seq_len}: no room to generate a token"
            )
        vocab = self.runner.model.spec.vocab_size
        mm_positions = {p for mm in mm_inputs or () for p in range(mm.offset, mm.offset + mm.embeds.shape[0])}
        bad = [t for i, t in enumerate(prompt_ids) if not (0 <= t < vocab) and i not in mm_positions]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        needed = self.block_manager.blocks_needed(prompt_len + 1)
        if needed > self.block_manager.num_blocks:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens needs {needed} KV blocks; the cache has only "
                f"{self.block_manager.num_blocks}"
            )
        if positions is not None:
            _check_positions(positions, prompt_len)
        bidirectional_len = 0
        prefix_lm = self.runner.model.spec.prefix_lm
        if prefix_lm is not None and positions is not None:
            raise InvalidRequest("explicit prompt positions are not accepted by a prefix-LM (GLM v1/130B) model")
        if prefix_lm is not None:
            bidirectional_len = prefix_lm.bidirectional_len(prompt_ids)  # InvalidRequest without [gMASK]/<sop>
            budget = self.scheduler.max_num_batched_tokens
            if prompt_len > budget:
                raise PromptTooLongError(
                    f"prompt length {prompt_len} > MAX_NUM_BATCHED_TOKENS {budget}: this model's prompt attends "
                    "bidirectionally and must be prefilled in one step; raise MAX_NUM_BATCHED_TOKENS"
                )
        eos = self.eos_token_ids if config.eos_token_id is None else frozenset({config.eos_token_id})
        if config.eos_token_id is not None and config.eos_token_id >= vocab:
            raise InvalidRequest(f"eos_token_id={config.eos_token_id} is outside the vocabulary [0, {vocab})")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(config.random_seed if config.random_seed is not None else random.getrandbits(63))
        return Request(
            request_id=request_id if request_id is not None else next(self._ids),
            prompt_ids=list(prompt_ids),
            config=config,
            # Never beyond what the whole cache holds, or a lone request could never be scheduled again.
            max_total_len=min(self.max_seq_len, prompt_len + config.max_new_tokens, self.cache_capacity_tokens),
            eos_token_ids=frozenset() if config.ignore_eos else eos,
            mm_inputs=list(mm_inputs or ()),
            generator=generator,
            bidirectional_len=bidirectional_len,
            positions=list(positions) if positions is not None else None,
        )

    @property
    def cache_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def new_request_id(self) -> int:
        return next(self._ids)

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        stops = req.config.stop_words_str
        matcher = StopStringMatcher(stops, include_stop=req.config.print_stop_words) if stops and detok else None
        self._text[req.request_id] = _TextState(detok, matcher)
        self.scheduler.add(req)

    def abort(self, request_id: int, reason: str = "cancelled") -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, reason)
            self._text.pop(request_id, None)
        return req

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = self._expire_timeouts()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        logits, sampled = self.runner.execute(batch)
        self.scheduler.advance(batch)
        self.step_count += 1
        requests = [s.request for s in sampled]
        tokens, logprobs = sample(logits, requests) if requests else ([], [])
        now = time.monotonic()
        for req, token, lp in zip(requests, tokens, logprobs, strict=True):
            req.output_ids.append(token)
            req.iter_count += 1
            if lp is not None:
                req.output_logprobs.append(lp)
            if req.first_token_time is None:
                req.first_token_time = now
            outputs.append(self._postprocess(req, 1))
        self.last_step_ms = (time.perf_counter() - start) * 1000
        return outputs

    def _postprocess(self, req: Request, num_new: int) -> RequestOutput:
        state = self._text[req.request_id]
        token = req.output_ids[-1]
        cfg = req.config
        reason = None
        allowed_to_stop = len(req.output_ids) >= cfg.min_new_tokens
        if allowed_to_stop and token in req.eos_token_ids:
            reason = "stop"
        elif allowed_to_stop and cfg.stop_words_list and match_stop_token_ids(req.output_ids, cfg.stop_words_list):
            reason = "stop"
        delta = ""
        if state.detokenizer is not None:
            # EOS is kept in token_ids but decoded with skip_special_tokens, so it adds no text.
            delta = state.detokenizer.push([token])
            if reason is not None or req.num_tokens >= req.max_total_len:
                delta += state.detokenizer.flush()
            if state.stop_matcher is not None:
                delta, hit = state.stop_matcher.feed(delta)
                if hit and allowed_to_stop:
                    reason = reason or "stop"
                elif hit:
                    # A stop string before min_new_tokens: RTP-LLM ignores stop words until then.
                    state.stop_matcher = None
        if reason is None and req.num_tokens >= req.max_total_len:
            reason = "length"
        if reason is not None and state.stop_matcher is not None and reason != "stop":
            delta += state.stop_matcher.flush()
        state.text += delta
        if reason is not None:
            self._finish(req, reason)
        return self._output(req, state, delta, num_new)

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self.requests.pop(req.request_id, None)

    def _output(self, req: Request, state: _TextState, delta: str, num_new: int, error=None) -> RequestOutput:
        if req.is_finished:
            self._text.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            text=state.text,
            delta_text=delta,
            token_ids=list(req.output_ids),
            num_new_tokens=num_new,
            finished=req.is_finished,
            finish_reason=req.finish_reason if req.is_finished else None,
            logprobs=list(req.output_logprobs) if req.config.logprobs is not None else None,
            aux_info=self.aux_info(req),
            error=error,
        )

    def aux_info(self, req: Request) -> dict[str, Any]:
        return {
            "cost_time": (time.monotonic() - req.arrival_time) * 1000,
            "iter_count": req.iter_count,
            "prefix_len": 0,
            "input_len": req.num_prompt_tokens,
            "reuse_len": req.reuse_len,
            "output_len": len(req.output_ids),
        }

    def _expire_timeouts(self) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for req in list(self.requests.values()):
            limit = req.config.timeout_ms
            if limit > 0 and (now - req.arrival_time) * 1000 > limit:
                outputs.append(self.fail(req, RequestTimeout(f"query has been running {limit} ms, it's timeout")))
        return outputs

    def fail(self, req: Request, error: RtpMmError) -> RequestOutput:
        """Finish ``req`` with an error; its blocks are released at once."""
        state = self._text.get(req.request_id) or _TextState(None, None)
        req.error = error
        self._finish(req, "error")
        return self._output(req, state, "", 0, error=error)

    def fail_all(self, error: RtpMmError) -> list[RequestOutput]:
        return [self.fail(req, error) for req in list(self.requests.values())]

    # ---- introspection ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "block_size": bm.block_size,
            "prefix_hit_tokens": bm.stats.prefix_hit_tokens,
            "prefix_evictions": bm.stats.evictions,
            "num_preemptions": self.scheduler.num_preemptions,
            "step_count": self.step_count,
            "last_step_ms": self.last_step_ms,
        }


def _check_positions(positions: list[int], prompt_len: int) -> None:
    """Explicit positions: one non-negative int per prompt token (PreparedPrompt.positions)."""
    if len(positions) != prompt_len:
        raise InvalidRequest(f"positions has {len(positions)} entries for a prompt of {prompt_len} tokens")
    bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool) or p < 0]
    if bad:
        raise InvalidRequest(f"positions must be non-negative integers, got {bad[:5]}")
