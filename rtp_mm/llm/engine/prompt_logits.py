"""What a request asks of its prompt's logits, computed in the prefill: OpenAI's prompt logprobs (``echo``),
RTP-LLM's ``calculate_loss``, and the ids ``return_logits`` reads.

The runner turns each prefill chunk's rows into logprobs of the next prompt token (plus the top-N) and keeps nothing
else (``ModelRunner._prompt_logprobs``); here they are checked at admission, recorded in position order on the
``Request`` and, once complete, reduced to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.model_runner import PromptLogprobs
from rtp_mm.llm.engine.request import Request


def initial_prompt_logprobs(config: GenerateConfig, prompt_len: int, has_images: bool) -> list | None:
    """``Request.prompt_logprobs`` at admission: [None] (position 0, which nothing predicts) when the prompt's logits
    are wanted, else None; raises InvalidRequest for what cannot be computed."""
    if config.prompt_logprobs is None and not config.calculate_loss:
        return None
    if has_images:
        raise InvalidRequest("prompt_logprobs and calculate_loss are not computed for prompts with images")
    if config.calculate_loss and prompt_len < 2:
        raise InvalidRequest("calculate_loss needs a prompt of at least 2 tokens (the first one has no loss)")
    return [None]


def select_token_ids(config: GenerateConfig, encode: Callable[[str], list[int]] | None, vocab: int) -> tuple[int, ...]:
    """return_logits' ids: select_tokens_id, then each of select_tokens_str encoded as a prompt is (RTP-LLM's
    ``tokenizer.encode``, special tokens included). Out of the vocabulary is 507, as in RTP-LLM."""
    ids = list(config.select_tokens_id)
    for text in config.select_tokens_str:
        if encode is None:
            raise InvalidRequest("select_tokens_str needs a tokenizer; give select_tokens_id")
        ids += encode(text)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"select_tokens_id {bad[:5]} are outside the vocabulary [0, {vocab})")
    return tuple(ids)


def record(req: Request, chunk: PromptLogprobs) -> None:
    """Append a chunk's entries in position order; positions already recorded (a prefill recomputed after a
    preemption) are skipped. The chunk that completes them computes calculate_loss."""
    recorded = req.prompt_logprobs
    if recorded is None:
        return
    skip = len(recorded) - chunk.first_position
    assert skip >= 0, "prefill chunks are computed in position order"
    recorded.extend(chunk.entries[skip:])
    if req.prompt_logprobs_done and req.config.calculate_loss:
        losses = [-entry[token] for token, entry in zip(req.prompt_ids[1:], recorded[1:], strict=True)]
        # RTP-LLM's calculate_loss=1 is exp(mean cross-entropy), the perplexity (its docs say "sum").
        req.loss = math.exp(sum(losses) / len(losses)) if req.config.calculate_loss == 1 else losses
