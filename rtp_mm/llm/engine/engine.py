"""LLMEngine: admission, then one synchronous step function, ``encode -> schedule -> run -> postprocess``.

Not thread-safe by itself: ``EngineLoop`` drives it from one thread, which therefore owns every piece of engine
state. Admission (``add``) turns a submitted ``EngineRequest`` into token ids (the prompt processor, for text and
chats), sends a request with images through the ``EncodeStage``, validates the result and queues a ``Request``; the
first output of every request says whether it was accepted. Each ``step`` encodes one image batch, schedules one
frozen batch, has the runner compute and sample it, then appends the tokens, detokenizes incrementally and applies
stop conditions (EOS, stop token sequences, stop strings, length, timeout).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rtp_mm.errors import EmptyPromptError, InvalidRequest, PromptTooLongError, RequestTimeout, RtpMmError
from rtp_mm.llm.engine import prompt_logits
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.detokenizer import IncrementalDetokenizer
from rtp_mm.llm.engine.model_runner import StepOutput
from rtp_mm.llm.engine.multimodal import EncodeStage, PreparedPrompt
from rtp_mm.llm.engine.request import EngineRequest, Request
from rtp_mm.llm.engine.scheduler import ScheduledBatch, Scheduler
from rtp_mm.llm.engine.speculative import Speculator
from rtp_mm.llm.engine.stop_words import StopStringMatcher, match_stop_token_ids
from rtp_mm.llm.engine.structured import GrammarCompiler, start_masks
from rtp_mm.llm.lora.manager import LoraManager, resolve_adapter
from rtp_mm.llm.models.prefix_lm import PrefixLM
from rtp_mm.llm.models.prompt_layout import PromptLayout

logger = logging.getLogger(__name__)

# What a caller submitted (text, a chat, ...) -> prompt token ids; rtp_mm.api.prompts.PromptProcessor is the one the
# builder hands the engine. (prompt, number of images) -> token ids; runs on the engine thread at admission.
PromptToIds = Callable[[Any, int], list[int]]


class Runner(Protocol):
    """What the engine needs of a model runner (ModelRunner; tests substitute their own)."""

    def execute(self, batch: ScheduledBatch) -> StepOutput: ...


@dataclass(frozen=True)
class ModelLimits:
    """Facts about the served model that admission checks requests against."""

    vocab_size: int
    max_seq_len: int
    prefix_lm: PrefixLM | None = None  # GLM v1/130B: the prompt layout rule (prefix_lm.py)
    prefix_len: int = 0  # P-tuning v2: prefix keys every request attends to (kv_prefix.py), aux_info.prefix_len


@dataclass
class RequestOutput:
    """What a request has produced so far (cumulative text and ids, plus this step's delta). The first output of
    every request is its admission: ``accepted`` (no tokens yet) or an ``error``."""

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
    accepted: bool = False  # the admission output: validated and queued for the scheduler
    # With config.prompt_logprobs, once the prefill is done (every later output): the prompt's ids and, per position,
    # its token's logprob plus the top-N (None at position 0). Shared with the engine: read-only.
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    loss: float | list[float] | None = None  # calculate_loss (1: perplexity, 2: per-token cross-entropy)
    logits: list[float] | None = None  # return_logits: the raw logits that produced the last token


@dataclass
class _TextState:
    """Per-request text machinery (lives in the engine; the Request stays tokenizer-free)."""

    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher | None
    text: str = ""


class LLMEngine:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        limits: ModelLimits,
        tokenizer: Any | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        prompt_processor: PromptToIds | None = None,
        encode_stage: EncodeStage | None = None,
        speculator: Speculator | None = None,
        lora: LoraManager | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.limits = limits
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.prompt_processor = prompt_processor
        self.encode_stage = encode_stage
        self.speculator = speculator  # speculative decoding (SP_TYPE): proposals verified in one forward
        self.lora = lora  # LoRA adapters requests select by adapter_name (llm/lora); None: none can be loaded
        self.requests: dict[int, Request] = {}
        self._encoding: dict[int, EngineRequest] = {}  # waiting in the encode stage
        self._text: dict[int, _TextState] = {}
        self.grammars = GrammarCompiler(tokenizer, limits.vocab_size, eos_token_ids)
        self.step_count = 0
        self.last_step_ms = 0.0
        self.shard_driver: Any = None  # tensor parallelism, rank 0: tp.ShardDriver (heartbeat, stop); None otherwise

    def idle(self) -> None:
        """Called by the loop while there is no work (the tensor-parallel heartbeat)."""
        if self.shard_driver is not None:
            self.shard_driver.idle()

    def close(self) -> None:
        """Called once by the loop as it stops: shard workers are told to exit."""
        if self.shard_driver is not None:
            self.shard_driver.stop()

    # ---- admission --------------------------------------------------------------------------------------------
    def add(self, submitted: EngineRequest) -> list[RequestOutput]:
        """Tokenize, then queue for encoding (images) or admit; returns the admission output (or the error)."""
        try:
            submitted.config.validate()
            token_ids = self._token_ids(submitted)
            if submitted.images:
                if self.encode_stage is None:
                    raise InvalidRequest("this model has no vision encoder: images are not accepted")
                self.encode_stage.add(submitted.request_id, token_ids, submitted.images)
                self._encoding[submitted.request_id] = submitted
                return []
            return [self._admit(submitted, self._expand(token_ids, []))]
        except RtpMmError as e:
            return [self._rejected(submitted, e)]
        except Exception as e:  # a fault in preparing this one request must not stop the engine
            logger.exception("preparing request %s failed", submitted.request_id)
            return [self._rejected(submitted, RtpMmError(f"preparing the request failed: {e!r}"))]

    def _token_ids(self, submitted: EngineRequest) -> list[int]:
        prompt = submitted.prompt
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)  # token ids, used as given
        if self.prompt_processor is None:
            raise InvalidRequest("this engine takes token ids only (no tokenizer was loaded)")
        return self.prompt_processor(prompt, len(submitted.images))

    def _admit(self, submitted: EngineRequest, prepared: PreparedPrompt) -> RequestOutput:
        req = self.make_request(submitted, prepared)
        self.requests[req.request_id] = req
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        stops = req.config.stop_words_str
        matcher = StopStringMatcher(stops, include_stop=req.config.print_stop_words) if stops and detok else None
        self._text[req.request_id] = _TextState(detok, matcher)
        self.scheduler.add(req)
        return self._output(req, self._text[req.request_id], "", 0, accepted=True)

    def prepare(self, submitted: EngineRequest) -> Request:
        """``add``'s admission path run to the end for one request without queueing it (its images encoded now, in
        one batch, uncached): the Request the scheduler would get. For tools that drive the runner themselves."""
        submitted.config.validate()
        token_ids = self._token_ids(submitted)
        if submitted.images and self.encode_stage is None:
            raise InvalidRequest("this model has no vision encoder: images are not accepted")
        rows = (
            self.encode_stage.encoder.encode([image.pixels for image in submitted.images]) if submitted.images else []
        )
        return self.make_request(submitted, self._expand(token_ids, rows, submitted.images))

    def _expand(self, token_ids: list[int], rows: list[torch.Tensor], images: tuple = ()) -> PreparedPrompt:
        """The prompt with its images' rows over their placeholders. A vision model checks every prompt, images or
        not: a placeholder without its image fails that request alone."""
        if self.encode_stage is None:
            return PreparedPrompt(token_ids)
        return self.encode_stage.encoder.expand(token_ids, rows, [image.content_hash for image in images])

    def make_request(self, submitted: EngineRequest, prepared: PreparedPrompt) -> Request:
        """Validate a prompt (images already expanded) and build its Request; raises InvalidRequest subclasses."""
        config, prompt_ids = submitted.config, prepared.token_ids
        if not prompt_ids:
            raise EmptyPromptError("prompt is empty: at least one token is needed")
        prompt_len, limits = len(prompt_ids), self.limits
        if prompt_len >= limits.max_seq_len:
            raise PromptTooLongError(
                f"prompt length {prompt_len} >= max_seq_len {limits.max_seq_len}: no room to generate a token"
            )
        image_rows = {p for mm in prepared.mm_inputs for p in range(mm.offset, mm.offset + mm.embeds.shape[0])}
        bad = [t for i, t in enumerate(prompt_ids) if not (0 <= t < limits.vocab_size) and i not in image_rows]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
        needed = self.block_manager.blocks_needed(prompt_len + 1)
        if needed > self.block_manager.num_blocks:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens needs {needed} KV blocks; the cache has only "
                f"{self.block_manager.num_blocks}"
            )
        layout = self._layout(prompt_ids, prepared.positions)
        if config.eos_token_id is not None and config.eos_token_id >= limits.vocab_size:
            vocab = limits.vocab_size
            raise InvalidRequest(f"eos_token_id={config.eos_token_id} is outside the vocabulary [0, {vocab})")
        eos = self.eos_token_ids if config.eos_token_id is None else frozenset({config.eos_token_id})
        prompt_logprobs = prompt_logits.initial_prompt_logprobs(config, prompt_len, bool(prepared.mm_inputs))
        encode = None if self.prompt_processor is None else lambda text: self.prompt_processor(text, 0)
        if config.logit_bias and max(config.logit_bias) >= limits.vocab_size:
            raise InvalidRequest(
                f"logit_bias token id {max(config.logit_bias)} is outside the vocabulary [0, {limits.vocab_size})"
            )
        generator = torch.Generator(device="cpu")
        generator.manual_seed(config.random_seed if config.random_seed is not None else random.getrandbits(63))
        return Request(
            request_id=submitted.request_id,
            prompt_ids=list(prompt_ids),
            config=config,
            # Never beyond what the whole cache holds, or a lone request could never be scheduled again.
            max_total_len=min(limits.max_seq_len, prompt_len + config.max_new_tokens, self.cache_capacity_tokens),
            eos_token_ids=frozenset() if config.ignore_eos else eos,
            mm_inputs=tuple(prepared.mm_inputs),
            layout=layout,
            arrival_time=submitted.arrival_time,
            generator=generator,
            adapter=resolve_adapter(self.lora, config.adapter_name),  # held to the end, whatever /update does
            grammar=self.grammars.matcher(config, frozenset() if config.ignore_eos else eos),
            prompt_logprobs=prompt_logprobs,
            select_token_ids=prompt_logits.select_token_ids(config, encode, limits.vocab_size)
            if config.return_logits
            else (),
        )

    def _layout(self, prompt_ids: list[int], positions: list[int] | None) -> PromptLayout:
        """The prompt's PromptLayout: the model's rule (GLM prefix-LM) or the explicit positions of its images."""
        prefix_lm = self.limits.prefix_lm
        if positions is not None:
            if prefix_lm is not None:
                raise InvalidRequest("explicit prompt positions are not accepted by a prefix-LM (GLM v1/130B) model")
            _check_positions(positions, len(prompt_ids))
            return PromptLayout(positions=tuple(positions))
        if prefix_lm is None:
            return PromptLayout()
        layout = prefix_lm.prompt_layout(prompt_ids)  # InvalidRequest without [gMASK]/<sop>
        budget = self.scheduler.max_num_batched_tokens
        if len(prompt_ids) > budget:
            raise PromptTooLongError(
                f"prompt length {len(prompt_ids)} > MAX_NUM_BATCHED_TOKENS {budget}: this model's prompt attends "
                "bidirectionally and must be prefilled in one step; raise MAX_NUM_BATCHED_TOKENS"
            )
        return layout

    @property
    def cache_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def abort(self, request_id: int, reason: str = "cancelled") -> bool:
        """Drop a request wherever it is (encode stage, queue, running); its KV blocks are freed at once."""
        self._encoding.pop(request_id, None)
        if self.encode_stage is not None and self.encode_stage.remove(request_id):
            return True
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, reason)
        self._text.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.release(request_id)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or (self.encode_stage is not None and self.encode_stage.has_work)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = self._expire_timeouts()
        if self.encode_stage is not None and self.encode_stage.has_work:
            outputs += self._encode()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        if self.speculator is not None:
            batch = self.speculator.propose(batch, self.requests)
        start_masks([self.requests.get(seq.request_id) for seq in batch.seqs if seq.sample], self.grammars.executor)
        result = self.runner.execute(batch)
        self.scheduler.advance()
        self.step_count += 1
        now = time.monotonic()
        for chunk in result.prompt_logprobs:
            if (req := self.requests.get(chunk.request_id)) is not None:
                prompt_logits.record(req, chunk)
        for item in result.tokens:
            req = self.requests.get(item.request_id)
            if req is None:  # finished while its token was computed (the runner failed it, say): nothing to add
                continue
            req.output_ids.append(item.token)
            if req.grammar is not None:
                req.grammar.consume(item.token)
            req.iter_count += 1
            if item.logprobs is not None:
                req.output_logprobs.append(item.logprobs)
            if item.logits is not None:
                req.last_logits = item.logits
            if req.first_token_time is None:
                req.first_token_time = now
            outputs.append(self._postprocess(req))
        outputs += self._finish_prefill_only(batch)
        if self.speculator is not None:  # accepted KV kept, rejected blocks freed, one output per request
            outputs = self.speculator.settle(batch, result, outputs, self.requests)
        self.last_step_ms = (time.perf_counter() - start) * 1000
        return outputs

    def _finish_prefill_only(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Requests with max_new_tokens=0 end when their prefill does: finish reason "length", no token."""
        outputs = []
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is not None and seq.sampling is None and req.num_computed_tokens >= req.max_total_len:
                self._finish(req, "length")
                outputs.append(self._output(req, self._text[req.request_id], "", 0))
        return outputs

    def _encode(self) -> list[RequestOutput]:
        """One encode-stage batch: expanded prompts are admitted, failures answered."""
        ready, failed = self.encode_stage.step()
        outputs = [self._rejected(self._encoding.pop(request_id), error) for request_id, error in failed]
        for request_id, prepared in ready:
            submitted = self._encoding.pop(request_id)
            try:
                outputs.append(self._admit(submitted, prepared))
            except RtpMmError as e:
                outputs.append(self._rejected(submitted, e))
        return outputs

    def _postprocess(self, req: Request) -> RequestOutput:
        state = self._text[req.request_id]
        token = req.output_ids[-1]
        cfg = req.config
        reason = None
        allowed_to_stop = len(req.output_ids) >= cfg.min_new_tokens
        if allowed_to_stop and token in req.eos_token_ids:
            reason = "stop"
        elif allowed_to_stop and cfg.stop_words_list and match_stop_token_ids(req.output_ids, cfg.stop_words_list):
            reason = "stop"
        elif req.grammar is not None and req.grammar.is_complete:  # a finished JSON value / regex match
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
        return self._output(req, state, delta, 1)

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self.requests.pop(req.request_id, None)

    def _output(
        self, req: Request, state: _TextState, delta: str, num_new: int, error=None, accepted: bool = False
    ) -> RequestOutput:
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
            accepted=accepted,
            **self._prompt_results(req),
        )

    @staticmethod
    def _prompt_results(req: Request) -> dict[str, Any]:
        """The optional per-request results of an output: prompt logprobs, loss, logits."""
        results: dict[str, Any] = {"loss": req.loss, "logits": req.last_logits}
        if req.config.prompt_logprobs is not None and req.prompt_logprobs_done:
            results |= {"prompt_token_ids": req.prompt_ids, "prompt_logprobs": req.prompt_logprobs}
        return results

    def _rejected(self, submitted: EngineRequest, error: RtpMmError) -> RequestOutput:
        """The output of a request that never reached the scheduler: finished, with its error."""
        self._encoding.pop(submitted.request_id, None)
        aux = {"cost_time": (time.monotonic() - submitted.arrival_time) * 1000, "iter_count": 0, "prefix_len": 0}
        aux |= {"input_len": 0, "reuse_len": 0, "output_len": 0}
        return RequestOutput(submitted.request_id, "", "", [], 0, True, "error", None, aux, error=error)

    def aux_info(self, req: Request) -> dict[str, Any]:
        return {
            "cost_time": (time.monotonic() - req.arrival_time) * 1000,
            "iter_count": req.iter_count,
            "prefix_len": self.limits.prefix_len,
            "input_len": req.num_prompt_tokens,
            "reuse_len": req.reuse_len,
            "output_len": len(req.output_ids),
        } | (self.speculator.aux_info(req) if self.speculator is not None else {})

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
        """Every request in the engine fails with ``error`` (an internal fault, or shutdown)."""
        encoding = list(self._encoding.values())
        for submitted in encoding:
            self.encode_stage.remove(submitted.request_id)
        outputs = [self._rejected(submitted, error) for submitted in encoding]
        return outputs + [self.fail(req, error) for req in list(self.requests.values())]

    # ---- introspection ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        stats = {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self._encoding),
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "block_size": bm.block_size,
            "prefix_hit_tokens": bm.stats.prefix_hit_tokens,
            "prefix_evictions": bm.stats.evictions,
            "num_preemptions": self.scheduler.num_preemptions,
            "step_count": self.step_count,
            "last_step_ms": self.last_step_ms,
        }
        if self.encode_stage is not None:
            stats.update(self.encode_stage.report())  # encoder-cache hits/misses, images encoded, ViT batches
        if self.speculator is not None:
            stats.update(self.speculator.report())  # proposed and accepted tokens
        return stats


def _check_positions(positions: list[int], prompt_len: int) -> None:
    """Explicit positions: one non-negative int per prompt token (PreparedPrompt.positions)."""
    if len(positions) != prompt_len:
        raise InvalidRequest(f"positions has {len(positions)} entries for a prompt of {prompt_len} tokens")
    bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool) or p < 0]
    if bad:
        raise InvalidRequest(f"positions must be non-negative integers, got {bad[:5]}")
