"""Verification of speculative proposals: the step's one target forward gave logits at every row of a sequence from
its last known token on (row i predicts the token after proposal i - 1); this turns them into the emitted tokens.

Greedy requests keep each proposal while it equals the target's argmax of its row and then emit the first argmax that
disagrees (or, when all agreed, the bonus row's): the tokens plain greedy decoding produces, row by row. Sampled
requests use rejection sampling (Leviathan et al. 2023; Chen et al. 2023): a proposal d drawn from q is kept with
probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from norm(max(0, p - q)); when every
proposal is kept a bonus token is drawn from the last row. p and q are the same processed distribution (the EOS mask
before min_new_tokens, temperature, top-k, top-p: ``sampler.masked_logits`` + ``sampling_probs``) of the target's and
the draft's logits; prompt lookup's q is a point mass on d. Each emitted token is thus distributed exactly as plain
sampling would draw it. Draws come from the request's own generator, so a seeded request is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.sampler import masked_logits, sample, sampling_probs
from rtp_mm.llm.engine.scheduler import SamplingParams, ScheduledSeq

# (request id, token, top-N logprobs or None, return_logits' raw logits or None): one emitted token
Emitted = tuple[int, int, dict[int, float] | None, list[float] | None]


def verify(logits: torch.Tensor, seqs: Sequence[ScheduledSeq]) -> list[Emitted]:
    """``logits`` [rows, vocab] float32: one row per sampled sequence without a proposal, 1 + len(proposal) rows per
    sequence with one, in batch order. Returns every emitted token in batch order, a sequence's in its order."""
    spans: list[tuple[int, int]] = []  # (first row, rows) per sequence
    row = 0
    for seq in seqs:
        rows = 1 + (len(seq.proposal) if seq.proposal is not None else 0)
        spans.append((row, rows))
        row += rows
    plain = [i for i, seq in enumerate(seqs) if seq.proposal is None]
    sampled: dict[int, tuple[int, dict[int, float] | None]] = {}
    if plain:  # sequences without a proposal sample exactly as in a step without speculation
        index = torch.tensor([spans[i][0] for i in plain], device=logits.device)
        tokens, logprobs = sample(logits[index], [seqs[i].sampling for i in plain])
        sampled = {i: (token, lp) for i, token, lp in zip(plain, tokens, logprobs, strict=True)}
    emitted: list[Emitted] = []
    for i, seq in enumerate(seqs):
        first, num_rows = spans[i]
        if seq.proposal is None:
            token, lp = sampled[i]
            emitted.append((seq.request_id, token, lp, _selected(logits[first], seq.logits_select)))
            continue
        rows = logits[first : first + num_rows]
        tokens = accepted_tokens(rows, seq.sampling, seq.proposal)
        top_n = seq.sampling.config.logprobs
        raw = torch.log_softmax(rows, dim=-1) if top_n is not None else None
        for j, token in enumerate(tokens):
            lp = None if raw is None else _logprobs(raw[j], token, top_n)
            emitted.append((seq.request_id, token, lp, _selected(rows[j], seq.logits_select)))
    return emitted


def accepted_tokens(rows: torch.Tensor, params: SamplingParams, proposal: Proposal) -> list[int]:
    """The tokens one sequence emits: the kept proposals and one more (a replacement or the bonus), 1 to
    len(proposal) + 1 of them. ``rows`` [len(proposal) + 1, vocab] raw target logits."""
    cfg = params.config
    proposed = proposal.token_ids
    tokens: list[int] = []
    for i in range(len(proposed) + 1):
        # Row i's EOS mask depends on how many tokens precede it (min_new_tokens).
        target = masked_logits(rows[i], dataclasses.replace(params, num_output_tokens=params.num_output_tokens + i))
        if cfg.is_greedy():
            tokens.append(int(target.argmax()))
            if i == len(proposed) or tokens[-1] != proposed[i]:
                return tokens
            continue
        p = sampling_probs(target, cfg)
        if i == len(proposed):  # every proposal kept: the bonus token
            tokens.append(_draw(p, params))
            return tokens
        d = proposed[i]
        q = None if proposal.draft_probs is None else proposal.draft_probs[i].to(p.device)
        q_d = 1.0 if q is None else float(q[d])
        # Keep d with probability min(1, p(d) / q(d)); q(d) > 0 since d was drawn from q.
        if float(torch.rand((), generator=params.generator)) * q_d < float(p[d]):
            tokens.append(d)
            continue
        residual = p.clone().index_fill_(0, torch.tensor([d], device=p.device), 0.0) if q is None else (p - q).clamp_(0)
        # A rejection implies p(d) < q(d), hence mass where p > q; rounding could still leave none.
        tokens.append(_draw(residual if float(residual.sum()) > 0 else p, params))
        return tokens
    raise AssertionError("unreachable: the last row always emits")


def _draw(weights: torch.Tensor, params: SamplingParams) -> int:
    # The request's generator is a CPU one (engine.make_request); multinomial normalises the weights.
    return int(torch.multinomial(weights.cpu(), 1, generator=params.generator))


def _logprobs(raw: torch.Tensor, token: int, top_n: int) -> dict[int, float]:
    """As the sampler reports them: the top-N of the raw distribution plus the chosen token."""
    entry = {}
    if top_n:
        top = torch.topk(raw, top_n)
        entry = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    entry[token] = float(raw[token])
    return entry


def _selected(row: torch.Tensor, select: tuple[int, ...] | None) -> list[float] | None:
    """return_logits: the raw logits row at ``select`` (the whole row when empty), or None when not asked."""
    if select is None:
        return None
    return (row[list(select)] if select else row).tolist()
