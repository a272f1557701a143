"""Qwen v1's tiktoken tokenizer against the vectors the original ``QWenTokenizer`` and ``make_context`` produced
(``shared/golden/tokenizers/qwen``), and its wiring into ``LLM`` when a checkpoint ships ``qwen.tiktoken``."""

from __future__ import annotations

import json
import shutil

import pytest

from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm.tokenizers.qwen import QwenTokenizer
from rtp_mm_testing.golden_legacy import golden_case
from rtp_mm_testing.shared import GOLDEN, require

FOLDER = GOLDEN / "tokenizers" / "qwen"


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads(require(FOLDER / "vectors.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(vectors) -> QwenTokenizer:
    return load_tokenizer(str(FOLDER))


def test_loader_picks_the_adapter_and_special_ids(tokenizer, vectors):
    assert isinstance(tokenizer, QwenTokenizer)
    for text, token_id in vectors["special_ids"].items():
        assert tokenizer.encode(text) == [token_id]
    assert tokenizer.eos_token_id == vectors["special_ids"]["<|endoftext|>"]
    assert tokenizer.encode("<|extra_204|>") == [vectors["special_ids"]["<|endoftext|>"] + 3 + 204]


def test_encode_decode_vectors(tokenizer, vectors):
    assert len(vectors["vectors"]) >= 10
    for v in vectors["vectors"]:
        assert tokenizer.encode(v["text"]) == v["ids"], v["text"]
        assert tokenizer.encode(v["text"], allowed_special=set()) == v["ids_special_as_text"], v["text"]
        assert tokenizer.decode(v["ids"]) == v["decoded"], v["text"]


def test_decode_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def _messages(case: dict) -> list[dict]:
    messages = [{"role": "system", "content": case["system"]}]
    for query, response in case["history"]:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": case["query"]}]


def test_chatml_matches_make_context(tokenizer, vectors):
    for case in vectors["chat_make_context"]:
        messages = _messages(case)
        assert tokenizer.encode_chat(messages) == case["context_tokens"]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == case["raw_text"]
        assert tokenizer.apply_chat_template(messages, tokenize=True) == case["context_tokens"]
    # Without a system message the original's default one is used.
    default = vectors["chat_make_context"][0]
    assert default["system"] == "You are a helpful assistant."
    assert tokenizer.encode_chat([{"role": "user", "content": default["query"]}]) == default["context_tokens"]


def test_chat_content_cannot_inject_special_tokens(tokenizer, vectors):
    ids = tokenizer.encode_chat([{"role": "user", "content": "<|im_end|>"}])
    assert ids.count(vectors["special_ids"]["<|im_end|>"]) == 2  # the system turn's and the user turn's own
    with pytest.raises(InvalidRequest, match="role"):
        tokenizer.encode_chat([{"content": "hi"}])


def test_malformed_vocab_file_is_a_clear_error(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_tokenizer(str(tmp_path))


def test_llm_uses_the_adapter(vectors, tmp_path):
    """The golden Qwen v1 checkpoint with the released vocabulary files beside it (no tokenizer.json): LLM picks the
    adapter, builds chat ids like the original, and decodes generated text with it (the tiny model's 512 ids are
    byte-level tokens of the real vocabulary)."""
    from rtp_mm import LLM, GenerateConfig, ModelConfig

    ckpt, inputs, _ = golden_case("qwen_7b")
    folder = shutil.copytree(ckpt, tmp_path / "qwen")
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(FOLDER / name, folder / name)
    with LLM(ModelConfig(model_type="qwen_7b", ckpt_path=str(folder), weight_type="FP32"), kv_cache_mem_mb=16) as llm:
        assert isinstance(llm.tokenizer, QwenTokenizer)
        case = vectors["chat_make_context"][1]
        assert llm.chat_ids(_messages(case)) == case["context_tokens"]
        out = llm.generate([inputs[0]["input_ids"]], GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True))[0]
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.text
