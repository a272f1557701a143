"""Qwen-VL's tokenizer: Qwen v1's tiktoken vocabulary plus nine grounding/image special tokens and image spans.

Facts of the original (Qwen-VL-Chat ``tokenization_qwen.py``, ``qwen_generation_utils.py``):

- After ``<|extra_204|>`` come ``<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>`` (151851..151859).
  These nine are always recognised, also where other special-token strings are tokenised as plain text (chat message
  content): that is how ``Picture 1: <img>...</img>`` inside a user message becomes an image span.
- ``<img>ref</img>`` becomes ``<img>``, the UTF-8 bytes of ``ref`` as ids 0-255, ``<imgpad>`` up to exactly 256 ids,
  ``</img>``; the model overwrites those 256 positions with the image's rows. Decoding turns a span back into
  ``<img>ref</img>``.
- ``from_list_format`` writes ``Picture k: <img>ref</img>\\n`` per image (k from 1) and the text items as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from rtp_mm.errors import InvalidRequest
from rtp_mm.tokenizers.qwen import VOCAB_FILE, QwenTokenizer

VL_SPECIAL_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
IMG_TOKEN_SPAN = 256


class QwenVLTokenizer(QwenTokenizer):
    """Invariant: every ``<img>`` of an encoded text is followed by exactly 256 ids and ``</img>``."""

    def __init__(self, vocab_file: str | Path):
        super().__init__(vocab_file, extra_special_tokens=VL_SPECIAL_TOKENS)
        self.img_start_id = self.special_tokens["<img>"]
        self.img_end_id = self.special_tokens["</img>"]
        self.img_pad_id = self.special_tokens["<imgpad>"]

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        allowed_special: Collection[str] | str = "all",
    ) -> list[int]:
        if allowed_special != "all":
            allowed_special = set(allowed_special) | set(VL_SPECIAL_TOKENS)
        ids = super().encode(text, add_special_tokens, allowed_special)
        return self._expand_image_refs(ids)

    def _expand_image_refs(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != self.img_start_id:
                out.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(self.img_end_id, i + 1)
            except ValueError:
                raise InvalidRequest("unclosed image tag: <img> without a following </img>") from None
            inner = ids[i + 1 : end]
            if any(t >= self.eod_id for t in inner):
                raise InvalidRequest("an <img>...</img> image reference may not contain special tokens")
            ref = b"".join(self.encoding.decode_single_token_bytes(t) for t in inner)
            if len(ref) > IMG_TOKEN_SPAN:
                raise InvalidRequest(
                    f"the image reference inside <img>...</img> is {len(ref)} bytes long; at most {IMG_TOKEN_SPAN}"
                )
            out += [self.img_start_id, *ref, *[self.img_pad_id] * (IMG_TOKEN_SPAN - len(ref)), self.img_end_id]
            i = end + 1
        return out

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return super().decode(self._collapse_image_spans(ids), skip_special_tokens, **kwargs)

    def _collapse_image_spans(self, ids: list[int]) -> list[int]:
        """Each complete ``<img>`` bytes+pads ``</img>`` span back to ``<img>`` + the reference's text ids +
        ``</img>``; anything that is not such a span (e.g. a span cut by a partial decode) is left as it is."""
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] == self.img_start_id and self.img_end_id in ids[i + 1 :]:
                end = ids.index(self.img_end_id, i + 1)
                inner = ids[i + 1 : end]
                ref = inner[: inner.index(self.img_pad_id)] if self.img_pad_id in inner else inner
                if all(t < 256 for t in ref):
                    text = bytes(ref).decode("utf-8", errors="replace")
                    out += [self.img_start_id, *self.encoding.encode_ordinary(text), self.img_end_id]
                    i = end + 1
                    continue
            out.append(ids[i])
            i += 1
        return out

    @staticmethod
    def from_list_format(items: list[dict[str, Any]]) -> str:
        """Qwen-VL's list format (``{"image": ref}``, ``{"text": ...}``, ``{"box": [...], "ref"?: ...}``) as text."""
        text = ""
        num_images = 0
        for item in items:
            if "image" in item:
                num_images += 1
                text += f"Picture {num_images}: <img>{item['image']}</img>\n"
            elif "text" in item:
                text += item["text"]
            elif "box" in item:
                if "ref" in item:
                    text += f"<ref>{item['ref']}</ref>"
                for box in item["box"]:
                    text += "<box>({},{}),({},{})</box>".format(*(int(v) for v in box))
            else:
                raise InvalidRequest(f"Qwen-VL list item {item!r} has none of 'image', 'text', 'box'")
        return text


def load(path: Path) -> QwenVLTokenizer | None:
    """Qwen-VL's: the same ``qwen.tiktoken`` plus the image/grounding specials and <img> spans (family ``qwen_vl``)."""
    if not (path / VOCAB_FILE).exists() or (path / "tokenizer.json").exists():
        return None
    return QwenVLTokenizer.from_dir(path)
