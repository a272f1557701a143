"""Baichuan / InternLM sentencepiece tokenizers (no remote code). No released vocabulary file is available here
(``shared/golden/tokenizers/index.json``), so a small sentencepiece BPE model with byte fallback is trained in the
test; the expected ids and strings follow the original tokenizer classes' rules (slow-tokenizer special-token
splitting, BOS from tokenizer_config.json, literal special pieces and InternLM's space clean-up on decode, the
Baichuan 195/196 and InternLM ``<|User|>``/``<|Bot|>`` chat layouts), built from sentencepiece's own pieces."""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
import sentencepiece as spm

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import ConfigError, InvalidRequest
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm.tokenizers.sentencepiece import SentencePieceTokenizer
from rtp_mm_testing.golden_legacy import golden_case


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice(".!?,") for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<eoh>", "<eoa>", "<|User|>", "<|Bot|>"],
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def _folder(tmp_path, sp_model, tokenizer_class: str, **config):
    folder = tmp_path / tokenizer_class
    folder.mkdir()
    shutil.copy(sp_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, **config}))
    return folder


@pytest.fixture()
def sp(sp_model):
    return spm.SentencePieceProcessor(model_file=str(sp_model))


def test_baichuan_encode_follows_tokenizer_config(tmp_path, sp_model, sp):
    baichuan2 = load_tokenizer(str(_folder(tmp_path, sp_model, "BaichuanTokenizer", add_bos_token=False)))
    assert isinstance(baichuan2, SentencePieceTokenizer)
    assert baichuan2.encode("hello world.") == sp.encode("hello world.")
    # Special-token strings are split out, the text around them encoded on its own, spaces kept (AddedTokens).
    assert baichuan2.encode("ab </s> cd") == sp.encode("ab ") + [2] + sp.encode(" cd")
    baichuan_7b = SentencePieceTokenizer.from_dir(_folder(tmp_path, sp_model, "BaiChuanTokenizer"))
    assert baichuan_7b.encode("hello") == [1] + sp.encode("hello")  # class default: BOS
    assert baichuan_7b.encode("hello", add_special_tokens=False) == sp.encode("hello")
    assert (baichuan_7b.bos_token_id, baichuan_7b.eos_token_id) == (1, 2)


def test_internlm_encode_strips_around_special_tokens(tmp_path, sp_model, sp):
    internlm = load_tokenizer(str(_folder(tmp_path, sp_model, "InternLMTokenizer")))
    assert internlm.encode("ab </s> cd") == [1] + sp.encode("ab") + [2] + sp.encode("cd")
    assert internlm.encode("<|User|>:hi<eoh>\n") == [1] + sp.encode("<|User|>:hi<eoh>\n")  # user-defined pieces


def test_decode_rules(tmp_path, sp_model, sp):
    baichuan = SentencePieceTokenizer.from_dir(_folder(tmp_path, sp_model, "BaichuanTokenizer"))
    internlm = SentencePieceTokenizer.from_dir(_folder(tmp_path, sp_model, "InternLMTokenizer"))
    ids = sp.encode("hello world , it is ok .")
    text = sp.decode(ids)
    assert text == "hello world , it is ok ."
    # The original writes the space before the text that precedes a special piece (never at position 0).
    assert baichuan.decode([1] + ids + [2]) == "<s> " + text + "</s>"
    assert baichuan.decode([1] + ids + [2], skip_special_tokens=True) == text
    assert internlm.decode(ids) == "hello world, it is ok."  # InternLM always cleans up spaces
    assert internlm.decode([1] + ids) == " <s>hello world, it is ok."
    assert internlm.decode([1] + ids + [2], skip_special_tokens=True) == "hello world, it is ok."
    assert internlm.clean_up_tokenization_spaces and not baichuan.clean_up_tokenization_spaces
    assert baichuan.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"]


def test_baichuan_chat_ids(tmp_path, sp_model, sp):
    tok = SentencePieceTokenizer.from_dir(_folder(tmp_path, sp_model, "BaichuanTokenizer", add_bos_token=False))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "again"},
    ]
    expected = sp.encode("be brief") + [195] + sp.encode("hello") + [196] + sp.encode("world")
    expected += [195] + sp.encode("again") + [196]
    assert tok.encode_chat(messages) == expected
    assert tok.apply_chat_template(messages, tokenize=True) == expected
    assert tok.encode_chat(messages[:3]) == expected[: -len(sp.encode("again")) - 2]  # ends with the assistant
    with pytest.raises(InvalidRequest, match="role"):
        tok.encode_chat([{"role": "tool", "content": "x"}])


def test_internlm_chat_prompt(tmp_path, sp_model):
    tok = SentencePieceTokenizer.from_dir(_folder(tmp_path, sp_model, "InternLMTokenizer"))
    first = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(first) == "<s><|User|>:hi<eoh>\n<|Bot|>:"
    history = first + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}]
    text = "<s><|User|>:hi<eoh>\n<|Bot|>:yo<eoa>\n<|User|>:and?<eoh>\n<|Bot|>:"
    assert tok.apply_chat_template(history) == text
    # The original passes this text through the tokenizer, which adds its own BOS in front of the literal <s>.
    assert tok.encode_chat(history) == tok.encode(text)
    assert tok.encode_chat(history)[:2] == [1, 1]


def test_bad_vocab_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"not a model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BaichuanTokenizer"}))
    with pytest.raises(ConfigError, match="sentencepiece"):
        load_tokenizer(str(folder))


def test_llm_uses_the_adapter(tmp_path, sp_model, sp):
    """The golden Baichuan2-7B checkpoint (512 ids, like this vocabulary) with Baichuan tokenizer files and no
    tokenizer.json: LLM picks the adapter, chat ids follow the original layout, generated text is decoded by it."""
    ckpt, _, _ = golden_case("baichuan2_7b")
    folder = _folder(tmp_path, sp_model, "BaichuanTokenizer", add_bos_token=False)
    for file in ckpt.iterdir():  # the tokenizer files sit beside the weights, as released
        shutil.copy(file, folder / file.name)
    config = ModelConfig(model_type="baichuan", ckpt_path=str(folder), weight_type="FP32")
    with LLM(config, kv_cache_mem_mb=16) as llm:
        assert isinstance(llm.tokenizer, SentencePieceTokenizer)
        ids = llm.chat_ids([{"role": "user", "content": "hello world"}])
        assert ids == [195] + sp.encode("hello world") + [196]
        out = llm.generate([ids], GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True))[0]
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
