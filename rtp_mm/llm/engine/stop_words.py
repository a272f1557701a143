"""Stop strings on streamed text and stop sequences on generated token ids.

A stop string can be split across any number of text deltas, so ``StopStringMatcher`` holds back the longest
suffix of what it has seen that could still grow into a stop string. The first stop string to *complete* (the
earliest end position; on a tie, the longest one) wins, which is what feeding one character at a time would
give: the result never depends on how the text was split into deltas.
"""

from __future__ import annotations


class StopStringMatcher:
    """Cuts a text stream at the first completed stop string.

    Invariants: the concatenation of every returned text (``feed`` outputs, then ``flush``) is the input up to the
    first completed stop string (through it when ``include_stop``, RTP-LLM's ``print_stop_words``), or the whole
    input when no stop string completes. Returned text never contains the start of a stop string that later
    completes. After a stop, ``feed`` returns ``("", True)`` and ``flush`` returns "".
    """

    def __init__(self, stop_strings: list[str], include_stop: bool = False) -> None:
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {stop_strings!r}")
        self.stop_strings = list(dict.fromkeys(stop_strings))
        self.include_stop = include_stop
        self.stopped = False
        # Every proper prefix of a stop string: a held-back suffix must be one of these.
        self._proper_prefixes = {s[:i] for s in self.stop_strings for i in range(1, len(s))}
        self._max_held = max((len(s) - 1 for s in self.stop_strings), default=0)
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string has completed)."""
        if self.stopped:
            return "", True
        buffer = self._held + delta
        match = self._first_match(buffer)
        if match is not None:
            start, end = match
            self.stopped = True
            self._held = ""
            return buffer[: end if self.include_stop else start], True
        num_held = self._num_held(buffer)
        self._held = buffer[len(buffer) - num_held :]
        return buffer[: len(buffer) - num_held], False

    def flush(self) -> str:
        """At finish without a stop: releases the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buffer: str) -> tuple[int, int] | None:
        # The held text holds no complete stop string, so searching held + delta from the start finds each stop
        # string's first occurrence; the earliest end wins, then the earliest start (the longest string).
        best: tuple[int, int] | None = None
        for stop in self.stop_strings:
            start = buffer.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or (end, start) < (best[1], best[0]):
                best = (start, end)
        return best

    def _num_held(self, buffer: str) -> int:
        for size in range(min(self._max_held, len(buffer)), 0, -1):
            if buffer[len(buffer) - size :] in self._proper_prefixes:
                return size
        return 0


def match_stop_token_ids(generated_ids: list[int], stop_words_list: list[list[int]]) -> int | None:
    """Length of the longest stop sequence that ``generated_ids`` ends with, or None (empty sequences never match)."""
    best: int | None = None
    num_generated = len(generated_ids)
    for stop_ids in stop_words_list:
        size = len(stop_ids)
        if size == 0 or size > num_generated or (best is not None and size <= best):
            continue
        if list(generated_ids[num_generated - size :]) == list(stop_ids):
            best = size
    return best
