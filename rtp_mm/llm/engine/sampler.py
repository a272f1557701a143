"""Sampler: logits -> next tokens (and optional top-N logprobs), one row per sampled sequence, as tensor ops over the
whole batch with one device->host copy per step.

Order per row: logprobs are taken from the raw distribution (before any processing, as documented for
``GenerateConfig.logprobs``); then ``logit_bias`` is added and the grammar's mask (structured outputs) applied; then
repetition / presence / frequency penalties; EOS masked until ``min_new_tokens``; then greedy (top_k == 1 or
temperature == 0) or temperature -> top-k -> top-p -> a draw. The draw is by inverse CDF from one uniform that the
row's request draws from its own ``torch.Generator``, so a seeded request samples the same tokens whatever else is in
the batch (rows are independent in every op here). Greedy rows draw nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.scheduler import SamplingParams

MIN_TEMPERATURE = 1e-5
NUCLEUS_CANDIDATES = 1024  # top-p on CPU looks for the nucleus among this many tokens before sorting the whole row


def sample(logits: torch.Tensor, rows: list[SamplingParams]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [n, vocab] float32, one row per sequence -> (token per row, logprobs dict per row or None)."""
    if not rows:
        return [], []
    top_n = [p.config.logprobs for p in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in top_n) else None
    logits = constrain(logits, rows)
    if all(_is_plain_greedy(p) for p in rows):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = _choose(masked_logits_batch(logits, rows), rows)
    return _to_host(tokens, raw_logprobs, top_n)


def constrain(logits: torch.Tensor, rows: list[SamplingParams]) -> torch.Tensor:
    """logits with each row's logit_bias added and its grammar's disallowed tokens at -inf (a copy when any row has
    either; the grammar masks were started before the forward pass, see ``structured``)."""
    biased = [i for i, p in enumerate(rows) if p.config.logit_bias]
    grammars = [i for i, p in enumerate(rows) if p.grammar is not None]
    if not biased and not grammars:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    if biased:
        pairs = [(i, t, b) for i in biased for t, b in rows[i].config.logit_bias.items() if t < vocab]
        if pairs:  # admission checked the ids; a padded vocabulary aside
            row_ids, token_ids, bias = zip(*pairs, strict=True)
            index = _long((row_ids, token_ids), logits.device)
            logits.index_put_((index[0], index[1]), torch.tensor(bias, dtype=logits.dtype).to(logits.device), True)
    if grammars:
        allowed = torch.stack([rows[i].grammar.allowed() for i in grammars]).to(logits.device)  # [g, vocab] bool
        index = _long(grammars, logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def masked_logits_batch(logits: torch.Tensor, rows: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [n, vocab] after each row's penalties and its EOS mask before min_new_tokens: what greedy takes the
    argmax of (a new tensor when any row changes)."""
    logits = penalties_batch(logits, rows)
    vocab = logits.shape[-1]
    # A user-supplied eos_token_id may be outside the vocabulary: it can never be drawn, so it needs no mask.
    pairs = [
        (i, t)
        for i, p in enumerate(rows)
        if p.num_output_tokens < p.config.min_new_tokens
        for t in p.eos_token_ids
        if t < vocab
    ]
    if pairs:
        index = _long(list(zip(*pairs, strict=True)), logits.device)
        logits = logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=logits.device))
    return logits


def penalties_batch(logits: torch.Tensor, rows: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [n, vocab] (a new tensor when any row has a penalty). HF-style repetition penalty over prompt + output;
    OpenAI-style presence/frequency penalties over the output only."""
    n, vocab = logits.shape
    device = logits.device
    repeated = [i for i, p in enumerate(rows) if p.config.repetition_penalty != 1.0]
    if repeated:
        # Image placeholder ids may lie outside the vocabulary (llava: -200); a negative index would wrap around.
        pairs = [(i, t) for i in repeated for t in set(rows[i].token_ids) if 0 <= t < vocab]
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
        if pairs:
            index = _long(list(zip(*pairs, strict=True)), device)
            seen[index[0], index[1]] = True
        penalty = _column([p.config.repetition_penalty for p in rows], logits)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    counted = [i for i, p in enumerate(rows) if (p.config.presence_penalty or p.config.frequency_penalty)]
    pairs = [(i, t) for i in counted for t in rows[i].output_ids if 0 <= t < vocab]
    if pairs:
        index = _long(list(zip(*pairs, strict=True)), device)
        counts = torch.zeros(n, vocab, dtype=logits.dtype, device=device)
        counts.index_put_((index[0], index[1]), torch.ones(len(pairs), dtype=logits.dtype, device=device), True)
        frequency = _column([p.config.frequency_penalty for p in rows], logits)
        presence = _column([p.config.presence_penalty for p in rows], logits)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def sampling_probs_batch(logits: torch.Tensor, configs: Sequence[GenerateConfig]) -> torch.Tensor:
    """The distributions [n, vocab] sampled rows draw from: temperature, top-k, top-p over ``masked_logits_batch``.
    A row whose every logit is -inf comes out NaN (``_choose`` falls back to its argmax)."""
    # A tiny temperature scales the logits to inf (inf - inf = NaN in softmax); below the floor it is greedy anyway.
    temperature = _column([max(c.temperature, MIN_TEMPERATURE) for c in configs], logits)
    logits = filter_top_k_top_p(logits / temperature, [c.top_k for c in configs], [c.top_p for c in configs])
    return logits.softmax(-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """logits [n, vocab] with everything outside each row's top-k and then its top-p nucleus set to -inf
    (top_k 0 or >= vocab and top_p 1 keep the row whole)."""
    vocab = logits.shape[-1]
    k = [kk if 0 < kk < vocab else 0 for kk in top_k]
    if any(k):
        top = torch.topk(logits, max(k), dim=-1).values  # [n, max_k], descending
        kth = top.gather(1, _long([max(kk, 1) - 1 for kk in k], logits.device)[:, None])
        kth = kth.masked_fill(_long(k, logits.device)[:, None] == 0, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    nucleus = [i for i, p in enumerate(top_p) if p < 1.0]  # top_p 1 must not drop a tail its cumsum rounds past 1
    if nucleus and len(nucleus) == len(top_p):
        return logits.masked_fill(_outside_nucleus(logits, _column(list(top_p), logits)), float("-inf"))
    if nucleus:
        index = _long(nucleus, logits.device)
        picked = logits[index]
        drop = _outside_nucleus(picked, _column([top_p[i] for i in nucleus], picked))
        logits = logits.clone()
        logits[index] = picked.masked_fill(drop, float("-inf"))
    return logits


def _outside_nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """bool [m, vocab]: the tokens top-p drops, those before which (in descending order) the mass already reaches the
    row's top_p [m, 1]; the first token always stays."""
    vocab = logits.shape[-1]
    width = min(NUCLEUS_CANDIDATES, vocab)
    if logits.device.type != "cpu" or width == vocab:
        return _sorted_outside_nucleus(logits, top_p)
    # Sorting a 49k vocabulary costs ~3.5 ms per row on CPU, and the nucleus nearly always lies among the top thousand
    # tokens (the default model at temperature 1: 30 rows in 32). In a row where it does, every token outside them
    # has at least top_p before it: dropped. The other rows are sorted whole. Picking them out costs nothing on CPU
    # (it would be a sync on a GPU, where the sort is cheap anyway).
    values, order = torch.topk(logits, width, dim=-1)
    probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    cumulative = probs.cumsum(-1)
    drop = _drop_sorted(cumulative - probs >= top_p, order, vocab)
    uncovered = (cumulative[:, -1] < top_p[:, 0]).nonzero()[:, 0]
    if len(uncovered):
        drop[uncovered] = _sorted_outside_nucleus(logits[uncovered], top_p[uncovered])
    return drop


def _sorted_outside_nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    return _drop_sorted(probs.cumsum(-1) - probs >= top_p, order, logits.shape[-1])


def _drop_sorted(drop: torch.Tensor, order: torch.Tensor, vocab: int) -> torch.Tensor:
    """A drop mask [m, width] of the ranked tokens ``order`` [m, width] as [m, vocab]; tokens outside ``order`` (when
    width < vocab) are dropped."""
    # A top_p below float32's smallest number compares as 0 and would drop the first token too (all -inf: NaN).
    drop[:, 0] = False
    outside = order.shape[-1] < vocab
    return torch.full((order.shape[0], vocab), outside, dtype=torch.bool, device=order.device).scatter(1, order, drop)


def apply_penalties(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [vocab] after ``params``' penalties (see ``penalties_batch``)."""
    return penalties_batch(logits[None], [params])[0]


def masked_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A row [vocab] after the penalties and the EOS mask before min_new_tokens: what greedy takes the argmax of.
    Speculative verification (``rejection``) processes target and draft rows with this and ``sampling_probs``, the
    same code as the batch, so its p and q are exactly what plain sampling draws from."""
    return masked_logits_batch(row[None], [params])[0]


def sampling_probs(row: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """The distribution [vocab] a sampled request draws from: temperature, top-k, top-p over ``masked_logits``."""
    return sampling_probs_batch(row[None], [config])[0]


def _is_plain_greedy(params: SamplingParams) -> bool:
    cfg = params.config
    return (
        cfg.is_greedy()
        and cfg.repetition_penalty == 1.0
        and not cfg.presence_penalty
        and not cfg.frequency_penalty
        and params.num_output_tokens >= cfg.min_new_tokens
    )


def _choose(logits: torch.Tensor, rows: list[SamplingParams]) -> torch.Tensor:
    """tokens [n] int64: the argmax of greedy rows, a draw from ``sampling_probs_batch`` for the others."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(rows) if not p.config.is_greedy()]
    if not drawn:
        return tokens
    # One uniform per sampled row, from its request's generator (a CPU one, engine.make_request), in batch order.
    uniforms = torch.cat([torch.rand(1, generator=rows[i].generator, dtype=torch.float64) for i in drawn])
    configs = [rows[i].config for i in drawn]
    uniforms = uniforms.to(logits.device)
    if len(drawn) == len(rows):
        return _draw(sampling_probs_batch(logits, configs), uniforms, tokens)
    index = _long(drawn, logits.device)
    tokens[index] = _draw(sampling_probs_batch(logits[index], configs), uniforms, tokens[index])
    return tokens


def _draw(probs: torch.Tensor, uniforms: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row the first token whose cumulative mass exceeds uniform * total. probs [m, vocab],
    uniforms [m] float64 in [0, 1), fallback [m]: the token of a row without mass (all -inf logits give NaN)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # float64: float32 would lose a small token's mass late in the sum
    total = cdf[:, -1:]
    # right=True skips zero-probability tokens (their cdf equals the one before); the target stays below the total
    # so that rounding cannot run past the last token that has mass.
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return torch.where(total[:, 0] > 0, tokens, fallback)


def _to_host(
    tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, top_n: list[int | None]
) -> tuple[list[int], list[dict[int, float] | None]]:
    """The step's one device->host copy: the tokens, and the logprobs of the rows that want them."""
    if raw_logprobs is None:
        return tokens.tolist(), [None] * len(top_n)
    width = min(max(n or 0 for n in top_n), raw_logprobs.shape[-1])
    columns = [tokens[:, None].to(torch.float64), raw_logprobs.gather(1, tokens[:, None]).to(torch.float64)]
    if width:
        top = torch.topk(raw_logprobs, width, dim=-1)
        columns += [top.indices.to(torch.float64), top.values.to(torch.float64)]
    host = torch.cat(columns, dim=1).tolist()  # float64 holds every token id and float32 logprob exactly
    token_list: list[int] = []
    logprobs: list[dict[int, float] | None] = []
    for row, n in zip(host, top_n, strict=True):
        token = int(row[0])
        token_list.append(token)
        if n is None:
            logprobs.append(None)
            continue
        n = min(n, width)
        entry = {int(t): v for t, v in zip(row[2 : 2 + n], row[2 + width : 2 + width + n], strict=True)}
        entry[token] = row[1]
        logprobs.append(entry)
    return token_list, logprobs


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [n, 1] column in ``like``'s dtype and device."""
    return torch.tensor(values, dtype=like.dtype).to(like.device)[:, None]


def _long(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)
