"""Qwen v1's tokenizer without its remote code: tiktoken over the released ``qwen.tiktoken`` file.

Facts of the original (``tokenization_qwen.py``): 151643 byte-level BPE ranks, the split pattern below (single
digits, unlike cl100k), NFC normalisation before encoding, no BOS/EOS added, and special tokens numbered right after
the ranks: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, then ``<|extra_0|>`` .. ``<|extra_204|>``. Decoding
with ``skip_special_tokens`` drops every id from ``<|endoftext|>`` on.

The chat prompt is ChatML built at the id level as the original ``make_context`` does: role, newline and content are
tokenised separately, content with special-token strings treated as plain text, so a message cannot inject
``<|im_end|>``.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.messages import text_content

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_SYSTEM = "You are a helpful assistant."


def load_ranks(path: Path) -> dict[bytes, int]:
    """``<base64 token> <rank>`` per line; a malformed line is a ConfigError naming the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ConfigError(f"{path}: line {lineno} is not '<base64 token> <rank>' ({e})") from e
    return ranks


class QwenTokenizer:
    """Duck-types the parts of a transformers tokenizer rtp-mm uses (encode, decode, eos_token_id, chat)."""

    chat_template = "chatml"  # built in code (see encode_chat); a non-empty value enables LLM.chat

    def __init__(self, vocab_file: str | Path, extra_special_tokens: Iterable[str] = ()):
        try:
            import tiktoken
        except ImportError as e:
            raise ConfigError(
                f"{vocab_file}: the Qwen tokenizer needs the 'tiktoken' package (pip install tiktoken)"
            ) from e
        ranks = load_ranks(Path(vocab_file))
        specials = SPECIAL_TOKENS + tuple(extra_special_tokens)
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(specials)}
        self.encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.eos_token_id = self.eod_id
        self.pad_token_id = self.eod_id
        self.bos_token_id = None

    @classmethod
    def from_dir(cls, folder: str | Path) -> QwenTokenizer:
        return cls(Path(folder) / VOCAB_FILE)

    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        allowed_special: Collection[str] | str = "all",
    ) -> list[int]:
        """``allowed_special="all"`` (the original's default) maps special-token strings to their ids; an empty set
        tokenises them as plain text. ``add_special_tokens`` is accepted for interface parity: Qwen adds none."""
        text = unicodedata.normalize("NFC", text)
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self.encoding.decode(ids, errors="replace")

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        """Raw token bytes decoded leniently (byte-level BPE has no byte-fallback pieces)."""
        single = isinstance(ids, int)
        tokens = [
            self.encoding.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ([ids] if single else ids)
        ]
        return tokens[0] if single else tokens

    # ---- chat -------------------------------------------------------------------------------------------------
    def _turn(self, role: str, content: str) -> list[int]:
        nl = self.encode("\n")
        body = self.encode(role, allowed_special=set()) + nl + self.encode(content, allowed_special=set())
        return [self.im_start_id] + body + [self.im_end_id]

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """ChatML ids: ``<|im_start|>role\\ncontent<|im_end|>`` turns joined by ``\\n``, a default system message when
        none is given, and ``\\n<|im_start|>assistant\\n`` to prompt the reply."""
        messages = _with_system(messages)
        nl = self.encode("\n")
        ids: list[int] = []
        for i, message in enumerate(messages):
            ids += (nl if i else []) + self._turn(_role(message), text_content(message, "Qwen"))
        if add_generation_prompt:
            ids += nl + [self.im_start_id] + self.encode("assistant") + nl
        return ids

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str | list[int]:
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)
        turns = [f"{IM_START}{_role(m)}\n{text_content(m, 'Qwen')}{IM_END}" for m in _with_system(messages)]
        return "\n".join(turns) + (f"\n{IM_START}assistant\n" if add_generation_prompt else "")


def _with_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]


def _role(message: dict[str, Any]) -> str:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"chat message {message!r} needs a non-empty string 'role'")
    return role


def load(path: Path) -> QwenTokenizer | None:
    """Qwen v1's ``qwen.tiktoken`` when the folder ships no tokenizer.json (family ``qwen``)."""
    if not (path / VOCAB_FILE).exists() or (path / "tokenizer.json").exists():
        return None
    return QwenTokenizer.from_dir(path)
