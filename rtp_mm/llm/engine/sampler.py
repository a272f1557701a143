"""Sampler: logits -> next tokens (and optional top-N logprobs), one row per sampled sequence.

Order per row: logprobs are taken from the raw distribution (before any processing, as documented for
``GenerateConfig.logprobs``); then ``logit_bias`` is added and the grammar's mask (structured outputs) applied; then
repetition / presence / frequency penalties; EOS masked until
``min_new_tokens``; then greedy (top_k == 1 or temperature == 0) or temperature -> top-k -> top-p -> a draw from the
request's own ``torch.Generator``, so a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.scheduler import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [vocab] (modified copy). HF-style repetition penalty over prompt + output; OpenAI-style
    presence/frequency penalties over the output only."""
    cfg = params.config
    vocab = logits.shape[0]
    if cfg.repetition_penalty != 1.0:
        # Image placeholder ids may lie outside the vocabulary (llava: -200); a negative index would wrap around.
        ids = sorted(t for t in set(params.token_ids) if 0 <= t < vocab)
        seen = torch.tensor(ids, dtype=torch.long, device=logits.device)
        picked = logits[seen]
        picked = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
        logits = logits.clone()
        logits[seen] = picked
    output_ids = params.output_ids
    if (cfg.presence_penalty or cfg.frequency_penalty) and output_ids:
        counts = torch.bincount(
            torch.tensor(output_ids, dtype=torch.long, device=logits.device), minlength=logits.shape[0]
        )[: logits.shape[0]].to(logits.dtype)
        logits = logits - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


MIN_TEMPERATURE = 1e-5


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [vocab] with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        # A top_p below float32's smallest number compares as 0 and would drop the first token too (all -inf: NaN).
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[SamplingParams]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [n, vocab] float32, one row per sequence -> (token per row, logprobs dict per row or None)."""
    tokens: list[int] = []
    logprobs: list[dict[int, float] | None] = []
    want_logprobs = any(p.config.logprobs is not None for p in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = constrain(logits, rows)
    plain = all(_is_plain_greedy(p) for p in rows)
    if plain:
        tokens = logits.argmax(dim=-1).tolist()
    for i, params in enumerate(rows):
        if not plain:
            tokens.append(_sample_row(logits[i], params))
        if params.config.logprobs is not None:
            row = raw_logprobs[i]
            top = torch.topk(row, params.config.logprobs) if params.config.logprobs else None
            entry = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            entry[tokens[i]] = float(row[tokens[i]])
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs


def constrain(logits: torch.Tensor, rows: list[SamplingParams]) -> torch.Tensor:
    """logits with each row's logit_bias added and its grammar's disallowed tokens at -inf (a copy when any row has
    either; the grammar masks were started before the forward pass, see ``structured``)."""
    constrained = [i for i, p in enumerate(rows) if p.grammar is not None or p.config.logit_bias]
    if not constrained:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in constrained:
        params = rows[i]
        if params.config.logit_bias:
            ids = [t for t in params.config.logit_bias if t < vocab]  # admission checked them; padded vocab aside
            logits[i, ids] += torch.tensor([params.config.logit_bias[t] for t in ids], dtype=logits.dtype)
        if params.grammar is not None:
            logits[i].masked_fill_(~params.grammar.allowed().to(logits.device), float("-inf"))
    return logits


def _is_plain_greedy(params: SamplingParams) -> bool:
    cfg = params.config
    return (
        cfg.is_greedy()
        and cfg.repetition_penalty == 1.0
        and not cfg.presence_penalty
        and not cfg.frequency_penalty
        and params.num_output_tokens >= cfg.min_new_tokens
    )


def _sample_row(row: torch.Tensor, params: SamplingParams) -> int:
    row = masked_logits(row, params)
    if params.config.is_greedy():
        return int(row.argmax())
    return int(torch.multinomial(sampling_probs(row, params.config), 1, generator=params.generator))


def masked_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A row [vocab] after the penalties and the EOS mask before min_new_tokens: what greedy takes the argmax of.
    Speculative verification (``rejection``) processes target and draft rows with this and ``sampling_probs``."""
    row = apply_penalties(row, params)
    # A user-supplied eos_token_id may be outside the vocabulary: it can never be drawn, so it needs no mask.
    eos = [t for t in params.eos_token_ids if t < row.shape[0]]
    if params.num_output_tokens < params.config.min_new_tokens and eos:
        row = row.clone()
        row[eos] = float("-inf")
    return row


def sampling_probs(row: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """The distribution [vocab] a sampled request draws from: temperature, top-k, top-p over ``masked_logits``."""
    # A tiny temperature scales the logits to inf (inf - inf = NaN in softmax); below the floor it is greedy anyway.
    row = filter_top_k_top_p(row / max(config.temperature, MIN_TEMPERATURE), config.top_k, config.top_p)
    return row.softmax(-1)
