"""GLM-4's tokenizer (glm-4-9b-chat, glm-4v-9b) without its remote code: tiktoken over the released ``tokenizer.model``.

Facts of the original ``ChatGLM4Tokenizer``:

- ``tokenizer.model`` is a tiktoken BPE file (``<base64 token> <rank>`` lines, 151329 ranks), split with the
  cl100k-style pattern below (digits in runs of up to three), no normalisation.
- Special tokens are added tokens (``tokenizer_config.json`` ``added_tokens_decoder``; 151329.. in the release, in
  the order of ``SPECIAL_TOKENS``). Written in a text they are recognised; in chat message content they are not.
- ``encode`` prepends ``[gMASK] <sop>``. ``decode`` turns special ids into their strings, each its own piece, with the
  pieces joined by a space (transformers-4 ``spaces_between_special_tokens``); ``skip_special_tokens`` drops them.
- Chat: ``[gMASK] <sop>``, then per message ``<|role|>`` + tokens(metadata + ``\\n``) + [image ids] + tokens(content),
  and ``<|assistant|>`` to prompt the reply. An image (GLM-4V, one per conversation) puts
  ``<|begin_of_image|> <|endoftext|> <|end_of_image|>`` right before the content of its message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.qwen import load_ranks

VOCAB_FILE = "tokenizer.model"
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
ROLES = ("system", "user", "assistant", "observation")
IMAGE_PLACEHOLDER = "<|begin_of_image|><|endoftext|><|end_of_image|>"
_IMAGE_PARTS = ("image", "image_url")


class GLM4Tokenizer:
    """Duck-types what rtp-mm uses of a transformers tokenizer. Invariant: ``special_ids`` holds every name of
    ``SPECIAL_TOKENS`` and none of its ids is a BPE rank."""

    chat_template = "glm4"  # built in code (encode_chat); a non-empty value enables LLM.chat
    clean_up_tokenization_spaces = False

    def __init__(self, vocab_file: str | Path, special_ids: dict[str, int] | None = None):
        try:
            import tiktoken
        except ImportError as e:
            raise ConfigError(f"{vocab_file}: the GLM-4 tokenizer needs the 'tiktoken' package") from e
        ranks = load_ranks(Path(vocab_file))
        self.n_words = len(ranks)
        self.special_ids = special_ids or {tok: self.n_words + i for i, tok in enumerate(SPECIAL_TOKENS)}
        missing = [tok for tok in SPECIAL_TOKENS if tok not in self.special_ids]
        clash = [tok for tok, i in self.special_ids.items() if 0 <= i < self.n_words]
        if missing or clash:
            raise ConfigError(
                f"{vocab_file}: special tokens missing {missing} or numbered inside the BPE ranks {clash}"
            )
        self.special_tokens = {i: tok for tok, i in self.special_ids.items()}
        self.encoding = tiktoken.Encoding(
            "glm4", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.all_special_ids = sorted(self.special_tokens)
        self.eos_token_id = self.pad_token_id = self.special_ids["<|endoftext|>"]
        self.bos_token_id = None
        self.gmask_token_id, self.sop_token_id = self.special_ids["[gMASK]"], self.special_ids["<sop>"]
        # The chat helpers stop at the next role token as well (glm-4 generation_config eos list).
        self.extra_eos_token_ids = frozenset({self.special_ids["<|user|>"], self.special_ids["<|observation|>"]})
        self.image_ids = [self.special_ids[t] for t in ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")]

    @classmethod
    def from_dir(cls, folder: str | Path) -> GLM4Tokenizer:
        """``tokenizer.model`` plus the special ids of ``tokenizer_config.json`` (added_tokens_decoder) when present."""
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        special_ids = None
        if config_file.is_file():
            added = json.loads(config_file.read_text()).get("added_tokens_decoder") or {}
            try:
                special_ids = {entry["content"]: int(i) for i, entry in added.items()} or None
            except (TypeError, KeyError, ValueError) as e:
                raise ConfigError(f"{config_file}: added_tokens_decoder is malformed ({e})") from e
        return cls(folder / VOCAB_FILE, special_ids)

    def __len__(self) -> int:
        return max(self.n_words, max(self.special_tokens) + 1)

    @property
    def vocab_size(self) -> int:
        return self.n_words

    # ---- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all")
        return [self.gmask_token_id, self.sop_token_id] + ids if add_special_tokens else ids

    def encode_plain(self, text: str) -> list[int]:
        """Special-token strings tokenised as plain text (chat message content)."""
        return self.encoding.encode_ordinary(text)

    def decode(
        self,
        ids: int | Iterable[int],
        skip_special_tokens: bool = False,
        spaces_between_special_tokens: bool = True,
        **_: Any,
    ) -> str:
        pieces: list[str] = []  # text runs and special tokens, each its own piece
        text, run = "", b""
        for i in [ids] if isinstance(ids, int) else ids:
            if 0 <= i < self.n_words:
                run += self.encoding.decode_single_token_bytes(i)
                continue
            if skip_special_tokens and i in self.special_tokens:
                continue  # removed before decoding: the byte run goes on across it
            text += run.decode("utf-8", "replace")  # a non-BPE id ends a byte run, as in the original
            run = b""
            if i in self.special_tokens:
                pieces += [text, self.special_tokens[i]]
                text = ""
            # other ids (the model's padding rows) have no text
        pieces.append(text + run.decode("utf-8", "replace"))
        return (" " if spaces_between_special_tokens else "").join(p for p in pieces if p)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        single = isinstance(ids, int)
        tokens = [self._token(i) for i in ([ids] if single else ids)]
        return tokens[0] if single else tokens

    def _token(self, i: int) -> str:
        if i in self.special_tokens:
            return self.special_tokens[i]
        if 0 <= i < self.n_words:
            return self.encoding.decode_single_token_bytes(i).decode("utf-8", "replace")
        return ""

    # ---- chat -------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Chat ids exactly as the original ``apply_chat_template`` builds them (image parts included)."""
        ids = [self.gmask_token_id, self.sop_token_id]
        images = 0
        for n, message in enumerate(messages):
            role, text, has_image = _message(n, message)
            images += has_image
            if images > 1:
                raise InvalidRequest("GLM-4V takes one image per conversation; this one has more")
            if not text and not has_image:
                continue  # the original skips messages with neither content nor image
            ids.append(self.special_ids[f"<|{role}|>"])
            ids += self.encode_plain(f"{message.get('metadata', '')}\n")
            ids += (self.image_ids if has_image else []) + self.encode_plain(text)
        return ids + [self.special_ids["<|assistant|>"]] if add_generation_prompt else ids

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str | list[int]:
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)
        text = "[gMASK]<sop>"
        for n, message in enumerate(messages):
            role, content, has_image = _message(n, message)
            if content or has_image:
                image = IMAGE_PLACEHOLDER if has_image else ""
                text += f"<|{role}|>{message.get('metadata', '')}\n{image}{content}"
        return text + ("<|assistant|>" if add_generation_prompt else "")


def _message(n: int, message: Any) -> tuple[str, str, bool]:
    """(role, text, has an image) of one chat message: ``content`` a string or a list of OpenAI-style parts
    (``text`` / ``image_url`` / ``image``); the original's own ``image`` key counts as an image too."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InvalidRequest(f"messages[{n}] must be {{'role': one of {list(ROLES)}, 'content': ...}}, got {message!r}")
    if message.get("tools"):
        raise InvalidRequest(f"messages[{n}]: tools are not supported by the GLM-4 chat format here")
    content = message.get("content") or ""
    has_image = message.get("image") is not None
    if isinstance(content, str):
        return message["role"], content, has_image
    if not isinstance(content, list):
        raise InvalidRequest(f"messages[{n}].content must be a string or a list of parts")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in _IMAGE_PARTS:
            if has_image:
                raise InvalidRequest("GLM-4V takes one image per conversation; this one has more")
            has_image = True
        else:
            raise InvalidRequest(f"messages[{n}].content has a part that is not text or an image: {part!r}")
    return message["role"], text, has_image


def load(path: Path) -> GLM4Tokenizer | None:
    """GLM-4's tiktoken ``tokenizer.model`` when the folder ships no tokenizer.json (family ``chatglm4v``, or any
    folder whose tokenizer_config.json names ChatGLM4Tokenizer)."""
    if not (path / VOCAB_FILE).exists() or (path / "tokenizer.json").exists():
        return None
    return GLM4Tokenizer.from_dir(path)
