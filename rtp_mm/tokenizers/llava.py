"""The original LLaVA prompt tokenization: the text is split on ``<image>``, each piece tokenized on its own, and
the pieces joined by the image id -200 (LLaVA's ``tokenizer_image_token``). A leading BOS is kept once: when the
first piece starts with BOS, the first token of every piece is dropped, as the original does.

Only original-layout tokenizers need it: llava-hf tokenizers carry ``<image>`` as an added token already.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rtp_mm.vision.llava import IMAGE_TOKEN_INDEX

IMAGE_TEXT = "<image>"


class LlavaImageTokenizer:
    """The LM's tokenizer with ``encode`` mapping ``<image>`` to -200; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        encode = self._tokenizer.encode
        chunks = [
            list(encode(part, add_special_tokens=add_special_tokens, **kwargs)) for part in text.split(IMAGE_TEXT)
        ]
        bos = self._tokenizer.bos_token_id
        offset = 1 if bos is not None and chunks[0][:1] == [bos] else 0
        ids = chunks[0][:offset]
        for n, chunk in enumerate(chunks):
            ids += ([IMAGE_TOKEN_INDEX] if n else []) + chunk[offset:]
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def with_image_token(tokenizer: Any) -> Any:
    """``tokenizer`` wrapped when ``<image>`` is not one of its tokens (original LLaVA), else unchanged (llava-hf)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return tokenizer if IMAGE_TEXT in vocab else LlavaImageTokenizer(tokenizer)


def load(path: Path) -> Any | None:
    """The LM's transformers tokenizer, with ``<image>`` -> -200 when it is an original LLaVA one (family ``llava``)."""
    from rtp_mm.tokenizers.loader import auto_tokenizer

    if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return None
    return with_image_token(auto_tokenizer(path))
