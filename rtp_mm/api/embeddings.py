"""SGPT sentence embeddings through an EngineClient: input preparation on the caller's thread, the prefill-only
forward of the engine's own model on the engine thread (``llm/engine/embedding.py``), pooling back on the caller's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rtp_mm.errors import EmptyPromptError, InvalidRequest
from rtp_mm.llm.engine import embedding


def embed(
    client: Any,  # the EngineClient (its info, tokenizer and model; ``call`` runs work on the engine thread)
    inputs: str | Sequence[str] | Sequence[Sequence[int]],
    is_query: bool = False,
    case_sensitive: bool = False,
    attention_mask: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """SGPT sentence embeddings [n, hidden], float32 with unit L2 norm: the position-weighted mean of the final
    hidden states, computed by the engine's own model in a prefill-only forward (no decoding, no KV pool).

    Texts are prepared as RTP-LLM's sgpt_bloom_vector does: lowercased unless ``case_sensitive``, then wrapped
    in ``[``...``]`` bracket tokens when ``is_query``, else ``{``...``}``. Token-id lists are used as given
    (brackets included). ``attention_mask`` (token ids only) marks padding with 0, e.g. a left-padded batch:
    padding is neither fed to the model nor pooled, but counts in the position weights as in
    sentence-transformers, so a padded input gives the same vector there as here.
    """
    info = client.info
    items = normalise_prompts(inputs)
    if attention_mask is not None and len(attention_mask) != len(items):
        raise InvalidRequest(f"attention_mask has {len(attention_mask)} rows for {len(items)} inputs")
    pooling = embedding.sentence_transformers_pooling(info.model_config.ckpt_path)
    if pooling not in (None, "weightedmean_tokens"):
        raise InvalidRequest(f"the checkpoint's pooling mode {pooling!r} is not supported (weightedmean_tokens)")
    padded: list[list[int]] = []
    masks: list[list[int]] = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            if attention_mask is not None:
                raise InvalidRequest("attention_mask applies to token-id inputs only, not to texts")
            if not item:
                raise EmptyPromptError(f"input {n} is empty")
            if client.tokenizer is None:
                raise InvalidRequest("text inputs need a tokenizer (this LLM was built with skip_tokenizer_init)")
            ids = embedding.sgpt_input_ids(client.tokenizer, item, is_query, case_sensitive, info.max_seq_len)
        else:
            ids = token_ids(item)
        given = None if attention_mask is None else attention_mask[n]
        padded.append(ids)
        masks.append(embedding.check_mask(n, ids, given, info.max_seq_len, info.vocab_size))
    return _pool(client, padded, masks)


def _pool(client: Any, padded: list[list[int]], masks: list[list[int]]) -> torch.Tensor:
    spans = [embedding.real_span(m) for m in masks]
    real = [ids[lo:hi] for ids, (lo, hi) in zip(padded, spans, strict=True)]
    info = client.info
    hidden: list[torch.Tensor] = []
    for group in embedding.batch_by_tokens(real, info.engine_config.step_token_budget):
        # On the engine thread, between steps: the forward never races a generation step for the model.
        hidden += client.call(lambda engine, g=group: engine.runner.prefill_hidden(g), 600.0)
    pooled = [embedding.pool_padded(h, m, span) for h, m, span in zip(hidden, masks, spans, strict=True)]
    if not pooled:
        return torch.zeros(0, info.hidden_size)
    return embedding.l2_normalize(torch.stack(pooled))


def token_ids(prompt: Any) -> list[int]:
    """A token-id prompt, checked (the engine's own check happens at admission; embeddings skip admission)."""
    if isinstance(prompt, str):
        raise InvalidRequest("expected token ids, got a string")
    if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise InvalidRequest(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def normalise_prompts(prompts: Any) -> list[str | list[int]]:
    """One prompt or several: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise InvalidRequest(f"prompts must be a string, a list of strings or token-id lists, got {type(prompts)}")
