"""Tokenizer loading without remote code, in this order: the tokenizer embedded in a GGUF file; rtp-mm's adapters
chosen by ``tokenizer_class`` (original vocabulary files that transformers reads only through remote code); the
family's own adapter (its declaration's ``tokenizer``, e.g. ChatGLM's ``ice_text.model``, Qwen's ``qwen.tiktoken``);
tokenizer.json / tokenizer_config.json through transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.family import resolve

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
    """A tokenizer for ``tokenizer_path``; raises ConfigError saying what is missing. ``family`` (the MODEL_TYPE's
    family) selects the family's own adapter, tried before transformers."""
    path = Path(tokenizer_path)
    gguf = _gguf_file(path)
    if gguf is not None:
        return _cached_gguf_tokenizer(gguf)
    if path.is_dir():
        adapter = None
        if family is not None and FAMILIES[family].tokenizer:
            adapter = resolve(FAMILIES[family].tokenizer)(path)
        adapter = adapter or _file_adapter(path)
        if adapter is not None:
            return adapter
    if not path.is_dir() or not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ConfigError(
            f"TOKENIZER_PATH={tokenizer_path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "point TOKENIZER_PATH at them, or run on token ids only (skip_tokenizer_init=True)"
        )
    return auto_tokenizer(path)


def auto_tokenizer(path: Path) -> Any:
    """transformers' tokenizer of a folder (tokenizer.json / tokenizer_config.json), never with remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"TOKENIZER_PATH={str(path)!r}: the tokenizer failed to load ({e})") from e


def _file_adapter(path: Path) -> Any | None:
    """rtp-mm's tokenizer for original vocabulary files that only remote code reads (no tokenizer.json shipped),
    whatever the MODEL_TYPE: Qwen v1's qwen.tiktoken, and by tokenizer_config.json's class Baichuan/InternLM
    sentencepiece or GLM-4's tiktoken."""
    if (path / "tokenizer.json").exists():
        return None
    if (path / "qwen.tiktoken").exists():
        from rtp_mm.tokenizers.qwen import QwenTokenizer

        return QwenTokenizer.from_dir(path)
    config_file = path / "tokenizer_config.json"
    tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if tokenizer_class == "ChatGLM4Tokenizer":
        from rtp_mm.tokenizers.glm4 import load

        return load(path)
    from rtp_mm.tokenizers.sentencepiece import SENTENCEPIECE_CLASSES, SentencePieceTokenizer

    if (path / "tokenizer.model").exists() and tokenizer_class in SENTENCEPIECE_CLASSES:
        return SentencePieceTokenizer.from_dir(path)
    return None
