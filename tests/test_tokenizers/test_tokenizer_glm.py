"""rtp-mm's ChatGLM tokenizer adapters over small sentencepiece models trained here (no real vocabulary files exist
in this environment), laid out like the originals: ``ice_text.model`` holds ChatGLM-6B's whitespace pieces and
special tokens as pieces; ChatGLM2/3's ``tokenizer.model`` is plain, its specials numbered after it. Expectations are
written from the original rules, not from the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.tokenizers.glm import ChatGLM2Tokenizer, ChatGLMTokenizer
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm_testing.shared import GOLDEN

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 0\n",
    "你好，世界！今天天气很好。",
    "Hello world, hello tokenizer; tokens and words.",
    "问：你是谁？答：我是一个语言模型。",
] * 40
V1_PIECES = ["<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, 81)), "[MASK]", "[gMASK]", "[sMASK]"]
V1_PIECES += ["<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<pad>"]
GREEDY = GenerateConfig(max_new_tokens=6, top_k=1, ignore_eos=True)


def _train(folder: Path, name: str, user_symbols: list[str], vocab: int) -> spm.SentencePieceProcessor:
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(folder / "sp"),
        vocab_size=vocab,
        user_defined_symbols=user_symbols,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "sp.model").rename(folder / name)
    (folder / "sp.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(folder / name))


@pytest.fixture(scope="module")
def ice(tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    folder = tmp_path_factory.mktemp("ice")
    return folder, _train(folder, "ice_text.model", V1_PIECES, 420)


@pytest.fixture(scope="module")
def glm2(tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    folder = tmp_path_factory.mktemp("glm2")
    return folder, _train(folder, "tokenizer.model", [], 400)


# ---- ChatGLM-6B ----------------------------------------------------------------------------------------------------


def test_chatglm_text_preprocessing(ice):
    folder, sp = ice
    tok = ChatGLMTokenizer(folder / "ice_text.model")
    text = "def f():\n\treturn  1" + " " * 83 + "x"
    # The original's rules by hand: newline -> <n>, tab -> <|tab|>, longest blanks first (83 = 80 + 3).
    manual = "def f():<n><|tab|>return<|blank_2|>1<|blank_80|><|blank_3|>x"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(manual)
    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert {"<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<|blank_3|>"} <= set(pieces)
    assert "▁▁" not in "".join(pieces)  # no raw runs of spaces reach sentencepiece
    for sample in (text, "你好\n\n  世界 ok", "a b  c   d\t\te", "emoji 🙂 and bytes"):
        assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample


def test_chatglm_special_tokens_and_offset(ice, tmp_path):
    folder, sp = ice
    tok = ChatGLMTokenizer(folder / "ice_text.model")
    gmask, sop, mask = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("[MASK]")
    assert tok.encode("hello") == sp.encode("hello") + [gmask, sop]  # model input: tokens + [gMASK] <sop>
    assert tok.encode("a [MASK] b", add_special_tokens=False).count(mask) == 1  # one id, not the letters
    assert tok.eos_token_id == sp.piece_to_id("<eop>") and tok.bos_token_id == sop
    assert tok.decode(tok.encode("hello"), skip_special_tokens=True) == "hello"
    # The first release shifted every id by 20000 image tokens (tokenizer_config.json num_image_tokens).
    shutil.copy(folder / "ice_text.model", tmp_path / "ice_text.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    shifted = load_tokenizer(str(tmp_path), "chatglm")
    assert shifted.encode("hello") == [i + 20000 for i in tok.encode("hello")]
    assert shifted.decode(shifted.encode("hi\n  there", add_special_tokens=False)) == "hi\n  there"


def test_chatglm_chat_format(ice):
    tok = ChatGLMTokenizer(ice[0] / "ice_text.model")
    first = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(first) == "你好"  # no history: the bare query
    convo = first + [{"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个笑话"}]
    assert tok.apply_chat_template(convo) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：讲个笑话\n答："
    assert tok.encode_chat(convo) == tok.encode("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：讲个笑话\n答：")
    with pytest.raises(InvalidRequest, match="end with a user message"):
        tok.encode_chat(convo[:2])


def test_llm_picks_the_chatglm_adapter(ice, tmp_path):
    """A ChatGLM-6B checkpoint folder with ice_text.model and no tokenizer.json gets the adapter; text prompts and
    chat run end to end and agree with the same prompt given as ids."""
    folder, sp = ice
    ckpt = tmp_path / "chatglm"
    shutil.copytree(GOLDEN / "chatglm_v1" / "checkpoint", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    ids = {k: sp.piece_to_id(p) for k, p in (("mask", "[MASK]"), ("gmask", "[gMASK]"), ("bos", "<sop>"))}
    config.update(mask_token_id=ids["mask"], gmask_token_id=ids["gmask"], bos_token_id=ids["bos"])
    config.update(eos_token_id=sp.piece_to_id("<eop>"))
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "ice_text.model", ckpt / "ice_text.model")
    llm = LLM(
        ModelConfig(model_type="chatglm", ckpt_path=str(ckpt), weight_type="FP32", max_seq_len=128), kv_cache_mem_mb=8
    )
    with llm:
        assert isinstance(llm.tokenizer, ChatGLMTokenizer)
        text = "hello\n  world"
        (by_text,) = llm.generate(text, GREEDY)
        (by_ids,) = llm.generate([llm.tokenizer.encode(text)], GREEDY)
        assert by_text.token_ids == by_ids.token_ids
        assert by_text.text == llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ]
        (chat,) = llm.chat(messages, GREEDY)
        (same,) = llm.generate([llm.tokenizer.encode("[Round 0]\n问：hi\n答：ok\n[Round 1]\n问：again\n答：")], GREEDY)
        assert chat.token_ids == same.token_ids


# ---- ChatGLM2 / ChatGLM3 -------------------------------------------------------------------------------------------


def test_chatglm2_tokens_and_chat(glm2):
    folder, sp = glm2
    tok = ChatGLM2Tokenizer(folder / "tokenizer.model", roles=False)
    n = sp.get_piece_size()  # specials follow the sentencepiece vocabulary: [MASK] [gMASK] [sMASK] sop eop
    assert tok.encode("hello world") == [n + 1, n + 3] + sp.encode("hello world")
    assert tok.encode("<|user|>", add_special_tokens=False) == sp.encode("<|user|>")  # ChatGLM2 has no role tokens
    assert tok.eos_token_id == 2 and not tok.extra_eos_token_ids
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    )
    assert prompt == "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答："
    expected = [n + 1, n + 3] + sp.encode("[Round 1]\n\n问：q\n\n答：")
    assert tok.encode_chat([{"role": "user", "content": "q"}]) == expected
    assert tok.decode([n + 1, n + 3, *sp.encode("你好 world")]) == "你好 world"  # ChatGLM2 hides its specials


def test_chatglm3_roles_and_chat(glm2):
    folder, sp = glm2
    tok = ChatGLM2Tokenizer(folder / "tokenizer.model", roles=True)
    n = sp.get_piece_size()
    system, user, assistant, observation = n + 5, n + 6, n + 7, n + 8  # 64794..64797 in the real vocabulary
    assert tok.encode("hi<|user|>there", add_special_tokens=False) == sp.encode("hi") + [user] + sp.encode("there")
    tools = [{"name": "f", "parameters": {}}]
    messages = [
        {"role": "system", "content": "be brief", "tools": tools},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "metadata": "f", "content": "call"},
        {"role": "observation", "content": "42"},
    ]
    nl = sp.encode("\n")
    expected = [n + 1, n + 3, system, *nl, *sp.encode("be brief\n" + json.dumps(tools, indent=4))]
    expected += [user, *nl, *sp.encode("hello"), assistant, *sp.encode("f\n"), *sp.encode("call")]
    expected += [observation, *nl, *sp.encode("42"), assistant]
    assert tok.encode_chat(messages) == expected
    assert tok.extra_eos_token_ids == {user, observation}
    assert tok.decode([user, *sp.encode("ok")]) == "<|user|>ok"
    assert tok.decode([user, *sp.encode("ok")], skip_special_tokens=True) == "ok"


def test_llm_picks_the_chatglm3_adapter_and_role_stops(glm2, tmp_path):
    folder, sp = glm2
    ckpt = tmp_path / "chatglm3"
    shutil.copytree(GOLDEN / "chatglm3" / "checkpoint", ckpt)
    shutil.copy(folder / "tokenizer.model", ckpt / "tokenizer.model")
    n = sp.get_piece_size()
    llm = LLM(
        ModelConfig(model_type="chatglm3", ckpt_path=str(ckpt), weight_type="FP32", max_seq_len=128), kv_cache_mem_mb=8
    )
    with llm:
        assert isinstance(llm.tokenizer, ChatGLM2Tokenizer) and llm.tokenizer.roles
        assert llm.client.info.eos_token_ids == {2, n + 6, n + 8}
        messages = [{"role": "user", "content": "hello"}]
        (chat,) = llm.chat(messages, GREEDY)
        (same,) = llm.generate([[n + 1, n + 3, n + 6, *sp.encode("\n"), *sp.encode("hello"), n + 7]], GREEDY)
        assert chat.token_ids == same.token_ids
    # The same folder as chatglm2: the ChatGLM2 adapter (no roles, only the checkpoint's EOS).
    with LLM(
        ModelConfig(model_type="chatglm2", ckpt_path=str(ckpt), weight_type="FP32", max_seq_len=128), kv_cache_mem_mb=8
    ) as llm2:
        assert not llm2.tokenizer.roles and llm2.client.info.eos_token_ids == {2}
        assert llm2.chat_ids([{"role": "user", "content": "x"}])[:2] == [n + 1, n + 3]


def test_tokenizer_json_still_wins(glm2, tmp_path):
    """A folder that also ships tokenizer.json is read by transformers as before (no adapter)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shutil.copy(glm2[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>"))
    ).save_pretrained(str(tmp_path))
    assert not isinstance(load_tokenizer(str(tmp_path), "chatglm2"), ChatGLM2Tokenizer)
