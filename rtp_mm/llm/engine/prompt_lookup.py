"""Prompt-lookup speculation (SP_TYPE=prompt_lookup): no draft model; the tokens that followed the sequence's last
n-gram where it occurred before, in the prompt or the output, are proposed.

Text that copies its input (rewriting, quoting, editing code, extraction) repeats long runs of the prompt, so such a
guess is often right for several tokens, and it costs a search over the request's own ids instead of a model.
Longer n-grams are tried first (a longer match is a more specific context); of several matches the latest wins, the
one nearest to what is being written.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.request import Request

# SP_MAX_TOKEN_MATCH / SP_MIN_TOKEN_MATCH when unset (speculative_config.py). Not 1: a single token recurs
# everywhere, its continuations are mostly wrong and cost verification rows.
MAX_NGRAM = 4
MIN_NGRAM = 2


def lookup(token_ids: list[int], k: int, vocab_size: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
    """Up to ``k`` ids that followed the latest earlier occurrence of the last n-gram of ``token_ids`` (n from
    ``max_ngram`` down to ``min_ngram``); () when none occurs. Ids outside the vocabulary (image placeholders) end the
    proposal: they can never be generated."""
    ids = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        # Windows of ids[:-1] end before the last id, so each match has a continuation and the suffix never
        # matches itself.
        hits = np.flatnonzero((sliding_window_view(ids[:-1], n) == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            proposed = ids[start : start + k].tolist()
            valid = next((i for i, t in enumerate(proposed) if not 0 <= t < vocab_size), len(proposed))
            return tuple(proposed[:valid])
    return ()


class PromptLookup:
    """The prompt-lookup proposer: stateless, every request is eligible (images and any prompt layout included:
    the target verifies in its own positions)."""

    def __init__(self, vocab_size: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def eligible(self, req: Request) -> bool:
        return True

    def propose(self, candidates: list) -> dict[int, Proposal]:
        proposals = {}
        for candidate in candidates:
            req = candidate.req
            ids = lookup(req.all_token_ids, candidate.k, self.vocab_size, self.max_ngram, self.min_ngram)
            if ids:
                proposals[req.request_id] = Proposal(ids)
        return proposals

    def settle(self, req: Request) -> None:
        pass

    def release(self, request_id: int) -> None:
        pass

    def keep_only(self, request_ids: set[int]) -> None:
        pass

    def report(self) -> dict[str, int]:
        return {}
