"""Tokenizer loading without remote code: tokenizer.json / tokenizer_config.json through transformers, or the
tokenizer embedded in a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if found and not any((path / f).exists() for f in _TOKENIZER_FILES):
            return found[0]
    return None


def load_tokenizer(tokenizer_path: str) -> Any:
    """A transformers tokenizer for ``tokenizer_path``; raises ConfigError saying what is missing."""
    path = Path(tokenizer_path)
    gguf = _gguf_file(path)
    if gguf is not None:
        from rtp_mm.llm.loader import load_gguf_tokenizer

        return load_gguf_tokenizer(gguf)
    if not path.is_dir() or not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ConfigError(
            f"TOKENIZER_PATH={tokenizer_path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "point TOKENIZER_PATH at them, or run on token ids only (skip_tokenizer_init=True)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"TOKENIZER_PATH={tokenizer_path!r}: the tokenizer failed to load ({e})") from e
