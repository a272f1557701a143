"""Tokenizer loading without remote code: tokenizer.json / tokenizer_config.json through transformers, or the
tokenizer embedded in a GGUF file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")


def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if found and not any((path / f).exists() for f in _TOKENIZER_FILES):
            return found[0]
    return None


def _cached_gguf_tokenizer(gguf: Path) -> Any:
    """Converting a GGUF vocabulary takes seconds; keep the converted tokenizer in the cache, keyed by the file's
    identity (path, size, mtime), and load it from there afterwards."""
    from transformers import AutoTokenizer

    from rtp_mm.config import cache_dir
    from rtp_mm.llm.loader import load_gguf_tokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf_tokenizers" / key
    if (folder / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception:  # a damaged cache entry: convert again
            logger.warning("cached tokenizer in %s is unreadable; converting %s again", folder, gguf)
    tokenizer = load_gguf_tokenizer(gguf)
    try:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only cache is not fatal
        logger.info("could not cache the converted tokenizer (%s)", e)
    return tokenizer


def load_tokenizer(tokenizer_path: str, family: str | None = None) -> Any:
    """A transformers tokenizer for ``tokenizer_path``; raises ConfigError saying what is missing. ``family`` (the
    MODEL_TYPE's family) picks rtp-mm's own adapter for original vocabulary files that transformers can only read
    through remote code (ChatGLM's ``ice_text.model`` / ``tokenizer.model``) when no tokenizer.json is there."""
    path = Path(tokenizer_path)
    gguf = _gguf_file(path)
    if gguf is not None:
        return _cached_gguf_tokenizer(gguf)
    if family is not None and path.is_dir():
        from rtp_mm.tokenizers.glm import load_glm_tokenizer

        adapter = load_glm_tokenizer(path, family)
        if adapter is not None:
            return adapter
    if not path.is_dir() or not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ConfigError(
            f"TOKENIZER_PATH={tokenizer_path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "point TOKENIZER_PATH at them, or run on token ids only (skip_tokenizer_init=True)"
        )
    adapter = _legacy_adapter(path, family)
    if adapter is not None:
        return adapter
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"TOKENIZER_PATH={tokenizer_path!r}: the tokenizer failed to load ({e})") from e
    if family == "llava":  # the original LLaVA's <image> -> -200 (llava-hf tokenizers have the token already)
        from rtp_mm.tokenizers.llava import with_image_token

        return with_image_token(tokenizer)
    return tokenizer


def _legacy_adapter(path: Path, family: str | None = None) -> Any | None:
    """rtp-mm's own tokenizers for checkpoints whose tokenizer class is remote code (no tokenizer.json shipped)."""
    if (path / "tokenizer.json").exists():
        return None
    if (path / "qwen.tiktoken").exists():
        from rtp_mm.tokenizers.qwen import QwenTokenizer

        if family == "qwen_vl":  # same vocabulary file, plus the image/grounding specials and <img> spans
            from rtp_mm.tokenizers.qwen_vl import QwenVLTokenizer

            return QwenVLTokenizer.from_dir(path)
        return QwenTokenizer.from_dir(path)
    from rtp_mm.tokenizers.sentencepiece import SENTENCEPIECE_CLASSES, SentencePieceTokenizer

    config = path / "tokenizer_config.json"
    tokenizer_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if (path / "tokenizer.model").exists() and tokenizer_class in SENTENCEPIECE_CLASSES:
        return SentencePieceTokenizer.from_dir(path)
    return None
