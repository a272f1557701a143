"""Incremental detokenization: turn a growing list of generated ids into text deltas that are safe to show.

Decoding every generated id at every step costs O(n) per token, O(n^2) per request. Like TGI and vLLM we decode
only a window ``ids[prefix_offset:]`` and subtract the text of its context tokens ``ids[prefix_offset:read_offset]``.
The context gives the decoder the left-hand neighbours it needs: sentencepiece-style decoders drop the leading
space of the first token they see, so the first token of a window must never be new text.

Text is held back while a later token could still change it:
- a trailing U+FFFD: an incomplete UTF-8 sequence that the next byte-level token may complete;
- an open run of sentencepiece byte-fallback pieces (``<0xE4>``): tokenizers' ByteFallback decoder turns the
  *whole* run into U+FFFD when any byte of it is invalid, so even a complete character inside a run is not final;
- with ``clean_up_tokenization_spaces``, a space near the end (" ." becomes "." once the "." arrives).
Whenever the window disagrees with what was already shown, one full decode decides (``num_full_decodes`` counts
them) and the window is re-anchored at the start. ``flush()`` always ends with one full decode, so the
concatenation of all deltas equals ``tokenizer.decode(ids)`` exactly. Per token the work is a few short decodes and
string operations on the window's text only; the text shown so far is kept as a list of deltas, joined when read.

The window relies on the decode being local: a token changes text only within a few characters of its own, which
holds for byte-level BPE, tiktoken, sentencepiece and tokenizers' Metaspace/ByteFallback/Strip decoders. A decoder
that rewrites text already shown (say one that applies Unicode normalisation to the whole text) is detected,
logged once, and continued by length.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# clean_up_tokenization's patterns (" .", " n't", " 've", ...) start with a space and are at most 4 characters long.
_CLEANUP_MARGIN = 3


class IncrementalDetokenizer:
    """Streams ``tokenizer.decode(ids, skip_special_tokens=...)`` one delta at a time.

    Invariants:
    - ``text`` (everything returned so far) is always a prefix of the decode of the final ids, whatever they turn
      out to be; after ``flush()`` it equals ``tokenizer.decode(ids, skip_special_tokens=...)``.
    - No delta ends in a U+FFFD that a later token could turn into a character.
    - The window relies on ``decode(ids[:n]) == sealed + decode(ids[prefix_offset:n])[len(context_text):]`` for every
      ``n >= read_offset``, where ``sealed`` (the text of ids[:read_offset]) is a prefix of ``text`` and
      ``context_text == decode(ids[prefix_offset:read_offset])`` is non-empty unless ``prefix_offset == 0``; where
      that fails, a full decode is used instead. ``text == sealed + shown_tail``.

    ``tokenizer`` is a transformers tokenizer or any object with ``decode(ids, skip_special_tokens=...)``;
    ``convert_ids_to_tokens`` (optional) is used to recognise byte-fallback pieces.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # transformers ignores the flag for BPE models; holding back a few characters for nothing is harmless.
        self._cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.token_ids: list[int] = []
        self.num_full_decodes = 0
        self._deltas: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._context_text = ""
        self._shown_tail = ""
        self._in_byte_run = False
        self._is_byte_piece_cache: dict[int, bool] = {}
        self._special_ids: set[int] | None = None
        self._finished = False
        self._diverged = False

    @property
    def text(self) -> str:
        """Everything returned so far (deltas and flush)."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def push(self, new_ids: Iterable[int] | int) -> str:
        """Feeds newly generated ids (one or several); returns the text that became safe to show (possibly "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.push() called after flush()")
        new_ids = [int(new_ids)] if isinstance(new_ids, int) else [int(i) for i in new_ids]
        if not new_ids:
            return ""
        self.token_ids.extend(new_ids)
        for token_id in new_ids:
            self._update_byte_run(token_id)
        if self._in_byte_run:
            # Nothing in an open byte-fallback run is final; skipping the decode also keeps long runs linear.
            return ""

        window_text = self._decode(self.token_ids[self._prefix_offset :])
        tail = None  # the text after `sealed`
        if window_text.startswith(self._context_text):
            tail = window_text[len(self._context_text) :]
            if not self._diverged and not tail.startswith(self._shown_tail):
                tail = None
        if tail is None:
            # The new tokens changed text left of read_offset, or the window's left edge decodes differently
            # inside the window than in the whole text: only a full decode knows the truth.
            window_text = tail = self._anchor_at_start()

        delta = self._show(tail)
        if self._can_seal(tail):
            self._seal(tail, window_text)
        return delta

    def flush(self) -> str:
        """Returns everything held back; afterwards ``text == tokenizer.decode(token_ids)``."""
        if self._finished:
            return ""
        self._finished = True
        full_text = self._full_decode()
        text = self.text
        if not self._diverged and not full_text.startswith(text):
            self._warn_diverged(text, full_text)
        rest = full_text[len(text) :]
        self._deltas.append(rest)
        return rest

    def _show(self, tail: str) -> str:
        safe = tail.rstrip(_REPLACEMENT_CHAR)
        if self._cleanup:
            # `sealed` has no space in its last characters (see _can_seal): only the tail can start a pattern.
            space = safe.find(" ", max(len(safe) - _CLEANUP_MARGIN, 0))
            if space >= 0:
                safe = safe[:space]
        if len(safe) <= len(self._shown_tail):
            return ""
        delta = safe[len(self._shown_tail) :]
        self._shown_tail = safe
        self._deltas.append(delta)
        return delta

    def _can_seal(self, tail: str) -> bool:
        if tail.endswith(_REPLACEMENT_CHAR):
            return False
        return not (self._cleanup and " " in tail[-_CLEANUP_MARGIN:])

    def _seal(self, tail: str, window_text: str) -> None:
        """Moves read_offset to the end; the old read_offset becomes the window start when it yields text."""
        num_ids = len(self.token_ids)
        context_text = window_text
        if self._read_offset > self._prefix_offset:
            new_context = self._decode(self.token_ids[self._read_offset : num_ids])
            # An empty context (a lone "▁", a skipped special token) would let the decoder strip the leading
            # space of the next real token, so the window keeps its older start instead.
            if new_context:
                self._prefix_offset = self._read_offset
                context_text = new_context
        self._read_offset = num_ids
        self._context_text = context_text
        self._shown_tail = self._shown_tail[len(tail) :]

    def _anchor_at_start(self) -> str:
        """Decodes everything and restarts the window at id 0 with nothing sealed; returns the full text."""
        full_text = self._full_decode()
        text = self.text
        if not self._diverged and not full_text.startswith(text):
            self._warn_diverged(text, full_text)
        self._prefix_offset = self._read_offset = 0
        self._context_text = ""
        self._shown_tail = text
        return full_text

    def _warn_diverged(self, text: str, full_text: str) -> None:
        # Only a decoder that rewrites text left of its newest tokens (see module docstring) gets here. Shown text
        # cannot be taken back, so from now on deltas continue by length and the tokenizer is named in the log.
        self._diverged = True
        common = 0
        for shown_char, full_char in zip(text, full_text, strict=False):
            if shown_char != full_char:
                break
            common += 1
        logger.warning(
            "incremental detokenization with %s diverged from the full decode at character %d: shown %r, decoded %r",
            type(self._tokenizer).__name__,
            common,
            text[common : common + 20],
            full_text[common : common + 20],
        )

    def _update_byte_run(self, token_id: int) -> None:
        if self._is_byte_piece(token_id):
            self._in_byte_run = True
        elif self._in_byte_run and self._skip_special_tokens and token_id in self._get_special_ids():
            pass  # a skipped special token never reaches the decoder: the run stays open across it
        else:
            self._in_byte_run = False

    def _is_byte_piece(self, token_id: int) -> bool:
        cached = self._is_byte_piece_cache.get(token_id)
        if cached is None:
            convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
            try:
                piece = convert(token_id) if convert is not None else None
            except (IndexError, KeyError, ValueError, TypeError, OverflowError):
                piece = None
            cached = isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None
            self._is_byte_piece_cache[token_id] = cached
        return cached

    def _get_special_ids(self) -> set[int]:
        if self._special_ids is None:
            special_ids = set(getattr(self._tokenizer, "all_special_ids", ()) or ())
            added = getattr(self._tokenizer, "added_tokens_decoder", None) or {}
            special_ids.update(i for i, token in added.items() if getattr(token, "special", False))
            self._special_ids = special_ids
        return self._special_ids

    def _full_decode(self) -> str:
        self.num_full_decodes += 1
        return self._decode(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
