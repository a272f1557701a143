"""GLM-4's tiktoken tokenizer adapter over a small BPE vocabulary trained here (the real ``tokenizer.model`` is not in
this environment), written in the original's file format. The oracle is transformers' own tiktoken conversion (a HF
``tokenizers`` BPE built from the same file); chat expectations are written from the original chat rules."""

from __future__ import annotations

import base64
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import regex

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.glm4 import SPECIAL_TOKENS, GLM4Tokenizer
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm_testing.shared import golden

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 12345 + 678 + 2024 * 366\n",
    "你好，世界！今天天气很好。",
    "Hello world, hello tokenizer; tokens and words.\n\n",
    "问：你是谁？答：我是一个语言模型。",
]
TEXTS = [
    "Hello world",
    "The year 2024 has 366 days.\n",
    "你好，世界！ mixed 文本 and emoji 🙂",
    "  leading spaces\tand tabs\n\n\nnewlines",
    "special <|user|> text [gMASK] here<|endoftext|>",
    "'s 't 're CAPS'LL",
]


def train_ranks(texts: list[str], num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair merged, repeatedly."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [
        [bytes([b]) for b in w.encode()] for t in texts for w in regex.findall(r"\p{N}+|\p{L}+|\s+|[^\s\p{L}\p{N}]+", t)
    ]
    while len(ranks) < num_ranks:
        pairs = Counter(p for w in words for p in zip(w, w[1:], strict=False))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


def write_vocab(folder: Path, num_ranks: int, special_ids: dict[str, int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(CORPUS, num_ranks)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    config: dict = {"tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>"}
    if special_ids is not None:
        config["added_tokens_decoder"] = {str(i): {"content": t, "special": True} for t, i in special_ids.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("glm4"), 600)


@pytest.fixture(scope="module")
def oracle(vocab):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # The converter's default split pattern is cl100k's, which GLM-4 uses: independent of the adapter's copy.
    converter = TikTokenConverter(str(vocab / "tokenizer.model"), extra_special_tokens=SPECIAL_TOKENS)
    return converter.converted()


def test_encode_decode_match_the_tiktoken_conversion(vocab, oracle):
    tok = load_tokenizer(str(vocab), "chatglm4v")
    assert isinstance(tok, GLM4Tokenizer)
    for name in SPECIAL_TOKENS:
        assert tok.encode(name, add_special_tokens=False) == [oracle.token_to_id(name)]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, text
        assert tok.encode(text) == [tok.special_ids["[gMASK]"], tok.special_ids["<sop>"]] + ids
        assert tok.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


def test_decode_shows_specials_as_separate_pieces(vocab):
    tok = GLM4Tokenizer.from_dir(vocab)
    s = tok.special_ids
    hi = tok.encode_plain("\nHello")
    ids = [s["[gMASK]"], s["<sop>"], s["<|user|>"], *hi, s["<|assistant|>"]]
    assert tok.decode(ids) == "[gMASK] <sop> <|user|> \nHello <|assistant|>"  # transformers-4 special spacing
    assert tok.decode(ids, skip_special_tokens=True) == "\nHello"
    euro = tok.encode_plain("€")  # 3 bytes: the run continues across a skipped special
    assert len(euro) == 3
    assert tok.decode([euro[0], s["<|endoftext|>"], *euro[1:]], skip_special_tokens=True) == "€"
    assert tok.decode([*hi, 1000]) == "\nHello"  # padding rows past the vocabulary have no text
    assert tok.eos_token_id == s["<|endoftext|>"] == tok.pad_token_id
    assert tok.extra_eos_token_ids == {s["<|user|>"], s["<|observation|>"]}


def test_chat_ids_follow_the_original_template(vocab):
    tok = GLM4Tokenizer.from_dir(vocab)
    s = tok.special_ids
    enc = tok.encode_plain
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is <|user|> here?"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "A fox."},
        {"role": "user", "content": "", "metadata": "m"},  # nothing to say: skipped, as the original does
        {"role": "observation", "content": "ok", "metadata": "tool"},
    ]
    expected = [s["[gMASK]"], s["<sop>"]]
    expected += [s["<|system|>"], *enc("\n"), *enc("Be brief.")]
    expected += [s["<|user|>"], *enc("\n"), s["<|begin_of_image|>"], s["<|endoftext|>"], s["<|end_of_image|>"]]
    expected += enc("What is <|user|> here?")  # content specials are plain text
    expected += [s["<|assistant|>"], *enc("\n"), *enc("A fox.")]
    expected += [s["<|observation|>"], *enc("tool\n"), *enc("ok"), s["<|assistant|>"]]
    assert tok.encode_chat(messages) == expected
    assert s["<|user|>"] not in enc("What is <|user|> here?")
    text = tok.apply_chat_template(messages)
    assert text.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|endoftext|><|end_of_image|>")
    assert text.endswith("<|observation|>tool\nok<|assistant|>")
    two = [{"role": "user", "content": [{"type": "image_url"}], "image": object()}]
    with pytest.raises(InvalidRequest, match="one image"):
        tok.encode_chat(two)
    with pytest.raises(InvalidRequest, match="role"):
        tok.encode_chat([{"role": "bot", "content": "x"}])


def test_bad_vocabulary_files(tmp_path):
    folder = write_vocab(tmp_path / "clash", 300, {t: i for i, t in enumerate(SPECIAL_TOKENS)})
    with pytest.raises(ConfigError, match="inside the BPE ranks"):
        GLM4Tokenizer.from_dir(folder)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_text("not-base64\n")
    with pytest.raises(ConfigError, match="line 1"):
        GLM4Tokenizer.from_dir(tmp_path / "bad")


def test_glm4v_chat_with_an_image_through_llm(tmp_path):
    """The golden GLM-4V checkpoint with a GLM-4 tokenizer whose specials carry the checkpoint's remapped ids: a chat
    with an image part becomes the original's id layout and runs through the vision path."""
    folder = golden("glm4v")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder / "checkpoint", ckpt)
    write_vocab(ckpt, 300, {t: 488 + i for i, t in enumerate(SPECIAL_TOKENS)})
    config = ModelConfig(model_type="chatglm4v", ckpt_path=str(ckpt), max_seq_len=128, weight_type="FP32")
    with LLM(config, kv_cache_mem_mb=4) as llm:
        assert isinstance(llm.tokenizer, GLM4Tokenizer)
        ids = llm.chat_ids([{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "Hi"}]}])
        assert ids[:7] == [490, 492, 495, *llm.tokenizer.encode_plain("\n"), 498, 488, 499]
        assert ids[-1] == 496
        cfg = GenerateConfig(max_new_tokens=4, top_k=1, ignore_eos=True)
        out = llm.generate(ids, cfg, images=[str(folder / "img0.png")])[0]
        assert out.aux_info["input_len"] == len(ids) + 3 and len(out.token_ids) == 4
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
