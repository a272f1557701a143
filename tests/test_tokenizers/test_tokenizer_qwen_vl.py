"""Qwen-VL's tokenizer against the vectors the original Qwen-VL-Chat ``QWenTokenizer`` produced
(``shared/golden/tokenizers/qwen_vl``, vocabulary file shared with ``../qwen``): special ids, encode with and without
special-token strings, decode, ChatML ids of ``make_context`` and ``from_list_format`` with image spans."""

from __future__ import annotations

import json
import shutil

import pytest

from rtp_mm.errors import InvalidRequest
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm.tokenizers.qwen import QwenTokenizer
from rtp_mm.tokenizers.qwen_vl import QwenVLTokenizer
from rtp_mm_testing.golden_legacy import golden_case
from rtp_mm_testing.shared import GOLDEN, require

FOLDER = GOLDEN / "tokenizers" / "qwen_vl"


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads(require(FOLDER / "vectors.json").read_text())


@pytest.fixture(scope="module")
def folder(vectors, tmp_path_factory):
    """The released Qwen-VL-Chat tokenizer files: its tokenizer_config.json and the (byte-identical) qwen.tiktoken."""
    out = tmp_path_factory.mktemp("qwen_vl_tokenizer")
    shutil.copy(FOLDER / "tokenizer_config.json", out / "tokenizer_config.json")
    shutil.copy(GOLDEN / "tokenizers" / "qwen" / "qwen.tiktoken", out / "qwen.tiktoken")
    return out


@pytest.fixture(scope="module")
def tokenizer(folder) -> QwenVLTokenizer:
    return load_tokenizer(str(folder), "qwen_vl")


def test_family_picks_the_vl_adapter(folder, tokenizer, vectors):
    assert isinstance(tokenizer, QwenVLTokenizer)
    assert type(load_tokenizer(str(folder), "qwen")) is QwenTokenizer  # same files, Qwen v1: no image specials
    for text, token_id in vectors["special_ids"].items():
        if text != "<img>":  # alone it is an unclosed image span (an error, see below)
            assert tokenizer.encode(text) == [token_id], text
    assert (tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_pad_id) == (151857, 151858, 151859)
    assert len(tokenizer) == 151860


def test_encode_decode_vectors(tokenizer, vectors):
    assert any("<img>" in v["text"] for v in vectors["vectors"])
    for v in vectors["vectors"]:
        assert tokenizer.encode(v["text"]) == v["ids"], v["text"]
        assert tokenizer.encode(v["text"], allowed_special=set()) == v["ids_special_as_text"], v["text"]
        assert tokenizer.decode(v["ids"]) == v["decoded"], v["text"]


def test_from_list_format(tokenizer, vectors):
    for case in vectors["from_list_format"]:
        text = tokenizer.from_list_format(case["list"])
        assert text == case["text"]
        assert tokenizer.encode(text) == case["ids"]
        assert tokenizer.decode(case["ids"]) == case["decoded"]


def test_chatml_matches_make_context(tokenizer, vectors):
    for case in vectors["chat_make_context"]:
        messages = [{"role": "system", "content": case["system"]}]
        for query, response in case["history"]:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": case["query"]})
        assert tokenizer.encode_chat(messages) == case["context_tokens"]


def test_image_span_in_chat_content(tokenizer, vectors):
    """An image written into a user message (how Qwen-VL chats about images) becomes a 256-id span; a ChatML
    special-token string in the same content stays plain text."""
    listed = vectors["from_list_format"][0]
    ids = tokenizer.encode_chat([{"role": "user", "content": listed["text"] + "<|im_end|>"}])
    start = ids.index(tokenizer.img_start_id)
    assert ids[start : start + 258] == listed["ids"][5 : 5 + 258]
    assert ids.count(tokenizer.im_end_id) == 2  # the system turn's and the user turn's own


def test_bad_image_spans_are_clear_errors(tokenizer):
    with pytest.raises(InvalidRequest, match="unclosed"):
        tokenizer.encode("Picture 1: <img>a.png")
    with pytest.raises(InvalidRequest, match="257 bytes"):
        tokenizer.encode("<img>" + "a" * 257 + "</img>")
    with pytest.raises(InvalidRequest, match="special tokens"):
        tokenizer.encode("<img>a<|endoftext|></img>")
    assert len(tokenizer.encode("<img>" + "é" * 128 + "</img>")) == 258  # 256 bytes: no padding left


def test_llm_uses_the_vl_adapter(folder, tmp_path):
    from rtp_mm import LLM, ModelConfig

    ckpt, _, _ = golden_case("qwen_vl")
    model = shutil.copytree(ckpt, tmp_path / "qwen_vl")
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(folder / name, model / name)
    config = ModelConfig(model_type="qwen_vl", ckpt_path=str(model), weight_type="FP32")
    with LLM(config, kv_cache_mem_mb=16) as llm:
        assert isinstance(llm.tokenizer, QwenVLTokenizer)
