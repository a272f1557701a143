"""A speculative proposal: the tokens a proposer guesses follow a sequence's last known token (speculative.py).

A leaf module, so that the scheduler's frozen ``ScheduledSeq`` can carry one without importing the proposers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Proposal:
    """Tokens proposed after a sequence's last known token, verified by the step's one target forward.

    ``draft_probs`` [len(token_ids), vocab] float32 is the draft model's processed distribution each token was drawn
    from, for rejection sampling; None when the proposal is deterministic (prompt lookup: a point mass) or the
    request is greedy (accepted while the target's argmax agrees)."""

    token_ids: tuple[int, ...]
    draft_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)
