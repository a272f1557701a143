"""Baichuan / Baichuan2 and InternLM v1 tokenizers without their remote code: sentencepiece over ``tokenizer.model``.

Both originals are transformers "slow" tokenizers over one sentencepiece model; the behaviour reproduced here:
- encode: the text is split on the special-token strings (``<s>``, ``</s>``, ``<unk>``, the pad token), each piece
  of text is encoded by sentencepiece on its own, special strings map to their ids; BOS/EOS are added per
  ``add_bos_token`` / ``add_eos_token`` of tokenizer_config.json (class defaults: BOS yes, EOS no). InternLM passes
  its special tokens as plain strings, which the slow tokenizer strips whitespace around; Baichuan wraps them in
  non-stripping AddedTokens.
- decode: special pieces are written literally (a space before a run of them, except at the very start for
  Baichuan), everything else through sentencepiece; InternLM then applies transformers' clean-up of spaces before
  punctuation and contractions, unconditionally.
- chat: Baichuan builds ids as ``system + [user_token_id] + content + [assistant_token_id] + content ... +
  [assistant_token_id]`` (ids 195/196 from generation_config.json); InternLM renders
  ``<s><|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n`` turns ending in ``<|User|>:{q}<eoh>\\n<|Bot|>:`` and encodes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.messages import text_content

VOCAB_FILE = "tokenizer.model"
FLAVOURS = {"BaichuanTokenizer": "baichuan", "BaiChuanTokenizer": "baichuan", "InternLMTokenizer": "internlm"}
SENTENCEPIECE_CLASSES = frozenset(FLAVOURS)
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class SentencePieceTokenizer:
    """Duck-types the parts of a transformers tokenizer rtp-mm uses (encode, decode, convert_ids_to_tokens,
    eos_token_id, chat)."""

    def __init__(
        self,
        vocab_file: str | Path,
        flavour: str = "baichuan",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        special_tokens: dict[str, str | None] | None = None,
        user_token_id: int = 195,
        assistant_token_id: int = 196,
    ):
        import sentencepiece as spm

        if flavour not in ("baichuan", "internlm"):
            raise ConfigError(f"sentencepiece tokenizer flavour {flavour!r} is not one of baichuan, internlm")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(vocab_file))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{vocab_file}: not a readable sentencepiece model ({e})") from e
        self.flavour = flavour
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
        if flavour == "internlm":
            names["pad_token"] = "</s>"
        names.update({k: v for k, v in (special_tokens or {}).items() if k in names and v})
        self.special_ids = {text: self.sp.piece_to_id(text) for text in names.values() if text}
        self.bos_token_id = self.special_ids.get(names["bos_token"] or "")
        self.eos_token_id = self.special_ids.get(names["eos_token"] or "")
        self.pad_token_id = self.special_ids.get(names["pad_token"] or "")
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
        self.user_token_id, self.assistant_token_id = user_token_id, assistant_token_id
        self.chat_template = flavour  # built in code (see encode_chat); a non-empty value enables LLM.chat
        # InternLM's decode always cleans up spaces; the incremental detokenizer must hold such text back.
        self.clean_up_tokenization_spaces = flavour == "internlm"

    @classmethod
    def from_dir(cls, folder: str | Path) -> SentencePieceTokenizer:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        flavour = FLAVOURS.get(config.get("tokenizer_class", ""))
        if flavour is None:
            raise ConfigError(
                f"{folder}: tokenizer_class {config.get('tokenizer_class')!r} is not one of {sorted(FLAVOURS)}"
            )
        generation = _read_json(folder / "generation_config.json")
        return cls(
            folder / VOCAB_FILE,
            flavour,
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            special_tokens={
                k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            },
            user_token_id=int(generation.get("user_token_id", 195)),
            assistant_token_id=int(generation.get("assistant_token_id", 196)),
        )

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text)
        for i, part in enumerate(parts):
            if part in self.special_ids and i % 2 == 1:
                ids.append(self.special_ids[part])
                continue
            if self.flavour == "internlm":  # plain-string special tokens: whitespace next to them is dropped
                part = part.lstrip() if i > 0 else part
                part = part.rstrip() if i < len(parts) - 1 else part
            if part:
                ids += self.sp.encode(part)
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
            ids += [self.eos_token_id] if self.add_eos_token else []
        return ids

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        special = set(self.special_ids.values())
        if skip_special_tokens:
            ids = [i for i in ids if i not in special]
        out, run, prev_special = "", [], False
        for n, i in enumerate(ids):
            if i in special:
                if not prev_special and (n or self.flavour == "internlm"):
                    out += " "
                out += self.sp.decode(run) + self.sp.id_to_piece(i)
                run, prev_special = [], True
            else:
                run.append(i)
                prev_special = False
        out += self.sp.decode(run)
        if self.flavour == "internlm":
            for old, new in _CLEANUPS:
                out = out.replace(old, new)
        return out

    # ---- chat -------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        if self.flavour == "internlm":
            return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
        ids: list[int] = []
        for i, message in enumerate(messages):
            role, content = _role(message), text_content(message, "sentencepiece")
            if role == "system":
                if i:
                    raise InvalidRequest("a system message is only accepted first")
                ids += self.encode(content)
                continue
            ids += [self.user_token_id if role == "user" else self.assistant_token_id] + self.encode(content)
        if add_generation_prompt and (not messages or _role(messages[-1]) != "assistant"):
            ids.append(self.assistant_token_id)
        return ids

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str | list[int]:
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)
        if self.flavour == "baichuan":  # the ids of encode_chat, shown with the role tokens' piece names
            return self.decode(self.encode_chat(messages, add_generation_prompt))
        text, query = "", None
        for message in messages:
            role, content = _role(message), text_content(message, "sentencepiece")
            if role == "user":
                query = content
            elif role == "assistant":
                text += f"<s><|User|>:{query or ''}<eoh>\n<|Bot|>:{content}<eoa>\n"
                query = None
            elif role != "system":
                raise InvalidRequest(f"InternLM chat accepts user/assistant messages, not role {role!r}")
        text = text or "<s>"
        if query is not None:
            text += f"<|User|>:{query}<eoh>\n" + ("<|Bot|>:" if add_generation_prompt else "")
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _role(message: dict[str, Any]) -> str:
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise InvalidRequest(f"chat message role {role!r} is not one of system, user, assistant")
    return role
