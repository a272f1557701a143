"""Tokenizers of the GLM releases without their remote code: small adapters over the original sentencepiece files.

- ChatGLM-6B (``ice_text.model``): text is preprocessed before sentencepiece, ``\\n`` -> ``<n>``, tab -> ``<|tab|>``,
  runs of 2..80 spaces -> ``<|blank_k|>`` (longest first), and decoding maps them back. Ids are sentencepiece ids
  plus ``num_image_tokens`` (tokenizer_config.json; 0 in the final 130528-vocab release, 20000 in the first one). The
  model input is ``tokens + [gMASK] <sop>``. Chat: the bare query, or ``[Round i]\\n问：…\\n答：…\\n`` rounds from 0
  when there is history.
- ChatGLM2/3 (``tokenizer.model``): plain sentencepiece; ``[MASK] [gMASK] [sMASK] sop eop`` (and, for ChatGLM3,
  ``<|system|> <|user|> <|assistant|> <|observation|>``) are numbered after the sentencepiece vocabulary in that order.
  The model input is ``[gMASK] sop + tokens``. ChatGLM2 chat: ``[Round n]\\n\\n问：…\\n\\n答：`` from 1; ChatGLM3 chat:
  per message ``<|role|>`` + tokens(metadata + ``\\n``) + tokens(content), then ``<|assistant|>``, and generation also
  stops at ``<|user|>`` / ``<|observation|>``. ChatGLM3 recognises role tokens written in text (RTP-LLM loads it with
  ``encode_special_tokens=True``); ChatGLM2 does not.

The adapters offer what rtp-mm uses of a transformers tokenizer: ``encode``, ``decode``, ``convert_ids_to_tokens``,
special ids, ``apply_chat_template`` (text) and ``encode_chat`` (ids exactly as the original chat helpers build them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError, InvalidRequest

MAX_BLANK = 80
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _processor(model_file: Path) -> Any:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
        raise ConfigError(f"{model_file}: not a readable sentencepiece model ({e})") from e


def _messages(messages: list[dict[str, Any]], roles: tuple[str, ...]) -> list[dict[str, Any]]:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content", ""), str):
            raise InvalidRequest(f"messages[{i}] must be {{'role': one of {list(roles)}, 'content': str}}, got {m!r}")
    return messages


def _rounds(messages: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, [(query, response)] history, final query) of a user/assistant conversation."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise InvalidRequest("a ChatGLM conversation must end with a user message")
    history, pending = [], None
    for m in turns[:-1]:
        if m["role"] == "user":
            if pending is not None:
                history.append((pending, ""))
            pending = m["content"]
        else:
            history.append((pending or "", m["content"]))
            pending = None
    if pending is not None:
        history.append((pending, ""))
    return system, history, turns[-1]["content"]


class ChatGLMTokenizer:
    """ChatGLM-6B (v1) over ``ice_text.model``. Invariant: ``decode(encode(t, False)) == t`` for text the
    sentencepiece model covers (byte fallback covers the rest)."""

    chat_template = "chatglm"  # marker: chat prompts are built by apply_chat_template below
    clean_up_tokenization_spaces = False

    def __init__(self, model_file: Path, num_image_tokens: int = 0):
        self.sp = _processor(model_file)
        self.offset = num_image_tokens
        self.special_ids = {}
        for piece in GLM_SPECIALS:
            piece_id = self.sp.piece_to_id(piece)
            if piece_id == self.sp.unk_id():
                raise ConfigError(f"{model_file}: lacks ChatGLM's special piece {piece!r}; is this ice_text.model?")
            self.special_ids[piece] = piece_id + self.offset
        self.gmask_token_id = self.special_ids["[gMASK]"]
        self.bos_token_id = self.special_ids["<sop>"]
        self.eos_token_id = self.special_ids["<eop>"]
        pad = self.sp.piece_to_id("<pad>")
        self.pad_token_id = pad + self.offset if pad != self.sp.unk_id() else None  # the original drops pads in decode
        self.all_special_ids = sorted(set(self.special_ids.values()))
        self._split = re.compile("(" + "|".join(re.escape(p) for p in GLM_SPECIALS) + ")")

    @staticmethod
    def preprocess(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, MAX_BLANK + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):  # special tokens written in the text are single ids
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(i + self.offset for i in self.sp.encode(self.preprocess(part)))
        return ids + [self.gmask_token_id, self.bos_token_id] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        skip = {self.pad_token_id, *(self.all_special_ids if skip_special_tokens else ())}
        pieces = [self._piece(i) for i in ids if i not in skip]
        return self.postprocess(self.sp.decode_pieces([p for p in pieces if p]))

    def _piece(self, i: int) -> str:
        """'' for image ids and the model's padding rows beyond the vocabulary (they have no text)."""
        j = i - self.offset
        return self.sp.id_to_piece(j) if 0 <= j < self.sp.get_piece_size() else ""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._piece(i) for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str | list[int]:
        system, history, query = _rounds(_messages(messages, ("system", "user", "assistant")))
        if not history:
            prompt = query
        else:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            prompt += f"[Round {len(history)}]\n问：{query}\n答："
        prompt = system + prompt
        return self.encode(prompt) if tokenize else prompt

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.apply_chat_template(messages, tokenize=True)


class ChatGLM2Tokenizer:
    """ChatGLM2/ChatGLM3 over ``tokenizer.model`` (``roles``: ChatGLM3's role tokens). Invariant: the special ids
    follow the sentencepiece vocabulary contiguously, in the original order."""

    clean_up_tokenization_spaces = False

    def __init__(self, model_file: Path, roles: bool):
        self.sp = _processor(model_file)
        self.roles = roles
        names = GLM2_SPECIALS + (GLM3_ROLES if roles else ())
        n = self.sp.get_piece_size()
        self.special_ids = {name: n + k for k, name in enumerate(names)}
        self.special_tokens = {v: k for k, v in self.special_ids.items()}
        self.gmask_token_id, self.sop_token_id = self.special_ids["[gMASK]"], self.special_ids["sop"]
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        self.all_special_ids = sorted({*self.special_ids.values(), self.eos_token_id, self.bos_token_id})
        # ChatGLM3 ends an assistant turn at the next role token (its chat helper's EOS set).
        self.extra_eos_token_ids = (
            frozenset({self.special_ids["<|user|>"], self.special_ids["<|observation|>"]}) if roles else frozenset()
        )
        self.chat_template = "chatglm3" if roles else "chatglm2"
        self._roles = re.compile("(" + "|".join(re.escape(r) for r in GLM3_ROLES) + ")") if roles else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        parts = self._roles.split(text) if self._roles else [text]
        for part in parts:
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return [self.gmask_token_id, self.sop_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        text, run = "", []
        for i in ids:
            if i in self.special_tokens:
                text += self.sp.decode(run)
                run = []
                if self.roles and not skip_special_tokens:  # ChatGLM3 shows its special tokens, ChatGLM2 hides them
                    text += self.special_tokens[i]
            elif 0 <= i < self.sp.get_piece_size() and not (skip_special_tokens and i in self.all_special_ids):
                run.append(i)  # ids past the specials are the model's padding rows: no text, as the original
        return text + self.sp.decode(run)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        n = self.sp.get_piece_size()
        return [self.special_tokens.get(i) or (self.sp.id_to_piece(i) if 0 <= i < n else "") for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str | list[int]:
        if self.roles:
            ids = self.encode_chat(messages)
            return ids if tokenize else self.decode(ids)
        system, history, query = _rounds(_messages(messages, ("system", "user", "assistant")))
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
        prompt = system + prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return self.encode(prompt) if tokenize else prompt

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """ChatGLM3: ``[gMASK] sop`` + per message ``<|role|>`` tokens(metadata\\n) tokens(content) + ``<|assistant|>``
        (a system message's ``tools`` are appended to its content as indented JSON, as the original does)."""
        if not self.roles:
            return self.apply_chat_template(messages, tokenize=True)
        ids = [self.gmask_token_id, self.sop_token_id]
        for m in _messages(messages, ("system", "user", "assistant", "observation")):
            content = m.get("content", "")
            if m["role"] == "system" and m.get("tools"):
                content += "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
            ids.append(self.special_ids[f"<|{m['role']}|>"])
            ids += self.sp.encode(f"{m.get('metadata', '')}\n") + self.sp.encode(content)
        return ids + [self.special_ids["<|assistant|>"]]


def _original_files(path: Path, vocabulary: str) -> bool:
    """The original release's files: its vocabulary and no tokenizer.json (which transformers would read itself),
    and not GLM-4's (whose tiktoken tokenizer.model the loader reads by its class, ChatGLM4Tokenizer)."""
    if not (path / vocabulary).exists() or (path / "tokenizer.json").exists():
        return False
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return config.get("tokenizer_class") != "ChatGLM4Tokenizer"


def load_chatglm(path: Path) -> ChatGLMTokenizer | None:
    """ChatGLM-6B's ``ice_text.model`` (family ``chatglm``)."""
    if not _original_files(path, "ice_text.model"):
        return None
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return ChatGLMTokenizer(path / "ice_text.model", int(config.get("num_image_tokens", 0)))


def load_chatglm2(path: Path) -> ChatGLM2Tokenizer | None:
    """ChatGLM2's sentencepiece ``tokenizer.model`` (family ``chatglm2``)."""
    if not _original_files(path, "tokenizer.model"):
        return None
    return ChatGLM2Tokenizer(path / "tokenizer.model", roles=False)


def load_chatglm3(path: Path) -> ChatGLM2Tokenizer | None:
    """ChatGLM3's: ChatGLM2's vocabulary plus the role tokens (family ``chatglm3``)."""
    if not _original_files(path, "tokenizer.model"):
        return None
    return ChatGLM2Tokenizer(path / "tokenizer.model", roles=True)
