"""GLM's prefix-LM layout (ChatGLM-6B v1 and GLM-130B): where a prompt's bidirectional part ends and which rotary
positions its tokens get.

A GLM prompt is ``context ... [MASK]/[gMASK] ... <sop>``: every prompt token sees every key before ``<sop>`` (the
bidirectional context); from ``<sop>`` on attention is causal. Generated tokens continue the blank opened at the
mask token, so their positions are anchored at the mask's index rather than counting up:

- 2D (ChatGLM-6B): token t gets ``(t, 0)`` before ``<sop>`` and ``(mask index, t - sop index + 1)`` from it on.
- 1D (GLM-130B): plain ``t``, except that for [MASK]/[sMASK] (not [gMASK]) every token from ``<sop>`` on gets the
  mask index.

This module is the whole rule: ``layout`` turns a prompt into a ``PromptLayout`` once per request, and the engine,
scheduler, prefix cache and attention read only that (its ``bidirectional_len`` makes the scheduler prefill the
prompt in one chunk, the prefix cache key blocks on the whole bidirectional part, and attention unmask it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.models.prompt_layout import PromptLayout


@dataclass(frozen=True)
class PrefixLM:
    """Special ids of one GLM checkpoint. ``mask_ids`` in priority order: the first of them present in the prompt is
    the blank being filled (ChatGLM-6B prefers [gMASK], GLM-130B's generate.py prefers [MASK] then [sMASK])."""

    sop_id: int
    mask_ids: tuple[int, ...]
    gmask_id: int
    two_d: bool

    def _find(self, prompt: Sequence[int]) -> tuple[int, int, bool]:
        """(index of <sop>, index of the mask token, whether it is [gMASK]); InvalidRequest if the prompt lacks them."""
        try:
            sop = prompt.index(self.sop_id)
        except ValueError:
            raise InvalidRequest(
                f"a GLM prompt must contain <sop> (token id {self.sop_id}) after [gMASK]/[MASK] "
                f"(ids {list(self.mask_ids)}); the tokenizer appends [gMASK] <sop> to a text prompt"
            ) from None
        for mask_id in self.mask_ids:
            try:
                return sop, prompt.index(mask_id, 0, sop), mask_id == self.gmask_id
            except ValueError:
                continue
        raise InvalidRequest(
            f"a GLM prompt needs a [gMASK]/[MASK] token (ids {list(self.mask_ids)}) before <sop> "
            f"(token id {self.sop_id}, at index {sop})"
        )

    def prompt_layout(self, prompt: Sequence[int]) -> PromptLayout:
        """The prompt's layout: bidirectional up to <sop>, GLM positions; InvalidRequest without <sop> or a mask."""
        sop, mask, gmask = self._find(prompt)
        n = len(prompt)
        if self.two_d:
            positions = tuple((t, 0) if t < sop else (mask, t - sop + 1) for t in range(n))
            return PromptLayout(positions=positions, bidirectional_len=sop)
        if gmask:  # GLM-130B [gMASK]: plain positions, generation counts on
            return PromptLayout(bidirectional_len=sop)
        return PromptLayout(positions=tuple(t if t < sop else mask for t in range(n)), hold=True, bidirectional_len=sop)
