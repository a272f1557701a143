"""Where a prompt's tokens sit for the model: their rotary positions and how far its attention is bidirectional.

The default is the causal LM's: positions 0..n-1, generated tokens counting on, causal attention. Two families place
prompts otherwise, each computing its layout once per request: GLM's prefix-LM (``prefix_lm.py``: a bidirectional
context, 2D or held positions) and chatglm4v's images (every row of an image shares one position). The engine, the
scheduler, the prefix cache and attention read only this object, never a family rule.
"""

from __future__ import annotations

from dataclasses import dataclass

Position = int | tuple[int, int]  # a plain rotary position, or GLM v1's 2D (position, block position)


@dataclass(frozen=True)
class PromptLayout:
    """Invariant: ``positions`` is None or holds one entry per prompt token."""

    positions: tuple[Position, ...] | None = None  # explicit positions of the prompt tokens; None = 0..n-1
    hold: bool = False  # generated tokens keep the last prompt position (GLM-130B's [MASK] blank), else count on
    bidirectional_len: int = 0  # prompt tokens before this index see each other (prefix-LM); 0 = causal

    def positions_of(self, start: int, end: int, prompt_len: int) -> list[Position]:
        """Positions of sequence indices [start, end) of a sequence whose prompt has ``prompt_len`` tokens."""
        if self.positions is None:
            return list(range(start, end))
        head = list(self.positions[start : min(end, prompt_len)])
        last = self.positions[-1]
        tail = range(max(start, prompt_len), end)
        if self.hold:
            return head + [last] * len(tail)
        if isinstance(last, tuple):  # 2D: the block position counts on, the position stays (GLM v1)
            return head + [(last[0], last[1] + 1 + t - prompt_len) for t in tail]
        return head + [last + 1 + t - prompt_len for t in tail]

    @property
    def is_plain(self) -> bool:
        return self.positions is None and not self.bidirectional_len
