"""The offline API on the real default model: prompt forms, stop strings, streaming, cancellation, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from rtp_mm import GenerateConfig
from rtp_mm.errors import EmptyPromptError, GenerateConfigError, InvalidRequest, PromptTooLongError, RequestTimeout

CHAT = [{"role": "user", "content": "Tell me about the city of Paris in three sentences."}]
GREEDY = dict(top_k=1, max_new_tokens=40)


def wait_all_blocks_free(llm, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = llm.stats()
        if stats["free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_prompt_forms(default_llm):
    cfg = GenerateConfig(max_new_tokens=4, top_k=1)
    text = "The quick brown fox"
    ids = default_llm.encode(text)
    by_text = default_llm.generate(text, cfg)
    by_list = default_llm.generate([text, text], cfg)
    by_ids = default_llm.generate([ids], cfg)
    assert len(by_text) == 1 and len(by_list) == 2
    assert by_text[0].token_ids == by_list[0].token_ids == by_list[1].token_ids == by_ids[0].token_ids
    assert by_text[0].aux_info["input_len"] == len(ids)


def test_stop_string_truncates_text(default_llm):
    full = default_llm.chat(CHAT, GenerateConfig(**GREEDY))[0]
    words = full.text.split()
    assert len(words) > 6, full.text
    stop = " " + words[5]
    cut = default_llm.chat(CHAT, GenerateConfig(**GREEDY, stop_words_str=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    kept = default_llm.chat(CHAT, GenerateConfig(**GREEDY, stop_words_str=[stop], print_stop_words=True))[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids(default_llm):
    full = default_llm.chat(CHAT, GenerateConfig(**GREEDY))[0]
    stop_seq = full.token_ids[3:5]
    out = default_llm.chat(CHAT, GenerateConfig(**GREEDY, stop_words_list=[stop_seq]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:5]


def test_stream_matches_generate_and_cancel_frees_blocks(default_llm):
    ids = default_llm.chat_ids(CHAT)
    full = default_llm.generate([ids], GenerateConfig(**GREEDY))[0]

    async def collect():
        deltas, last = [], None
        async for out in default_llm.generate_stream(ids, GenerateConfig(**GREEDY)):
            deltas.append(out.delta_text)
            last = out
        return deltas, last

    deltas, last = asyncio.run(collect())
    assert "".join(deltas) == last.text == full.text
    assert last.token_ids == full.token_ids and last.finished

    async def cancel_early():
        async for out in default_llm.generate_stream(ids, GenerateConfig(top_k=1, max_new_tokens=500)):
            if len(out.token_ids) >= 3:
                break

    asyncio.run(cancel_early())
    wait_all_blocks_free(default_llm)


def test_seeded_sampling_is_reproducible_alone_and_batched(default_llm):
    ids = default_llm.chat_ids(CHAT)
    cfg = GenerateConfig(max_new_tokens=16, top_p=0.9, temperature=0.9, random_seed=1234)
    alone = default_llm.generate([ids], cfg)[0].token_ids
    other = GenerateConfig(max_new_tokens=16, top_p=0.9, temperature=0.9, random_seed=99)
    batched = default_llm.generate([ids[:-3], ids, ids[:10]], cfg)[1].token_ids
    mixed = [r.token_ids for r in default_llm.generate([ids, ids], other)]
    assert alone == batched
    assert mixed[0] == mixed[1]


def test_logprobs(default_llm):
    out = default_llm.generate("Hello", GenerateConfig(max_new_tokens=3, top_k=1, logprobs=3))[0]
    assert len(out.logprobs) == 3
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and entry[token] == max(entry.values()) <= 0.0


def test_request_errors(default_llm):
    with pytest.raises(EmptyPromptError):
        default_llm.generate([[]])
    with pytest.raises(PromptTooLongError):
        default_llm.generate([[1] * default_llm.max_seq_len])
    with pytest.raises(GenerateConfigError, match="top_p"):
        default_llm.generate("hi", GenerateConfig(top_p=3.0))
    with pytest.raises(InvalidRequest, match="not valid Unicode"):  # a lone surrogate (tokenizers: bare TypeError)
        default_llm.generate("hi \ud800", GenerateConfig(max_new_tokens=1))
    with pytest.raises(RequestTimeout):
        default_llm.generate("hi", GenerateConfig(max_new_tokens=2000, top_k=1, ignore_eos=True, timeout_ms=200))
    wait_all_blocks_free(default_llm)
    # the engine still serves
    assert default_llm.generate("hi", GenerateConfig(max_new_tokens=2, top_k=1))[0].aux_info["output_len"] == 2


def test_kv_cache_too_small_states_the_minimum(tmp_path):
    from rtp_mm import LLM, ModelConfig
    from rtp_mm.errors import ConfigError
    from rtp_mm_testing.oracle import tiny_llama

    tiny_llama(tmp_path / "m")
    cfg = ModelConfig(model_type="llama", ckpt_path=str(tmp_path / "m"), weight_type="FP32", max_seq_len=1 << 20)
    with pytest.raises(ConfigError, match=r"KV_CACHE_MEM_MB=1 gives \d+ KV blocks .* set KV_CACHE_MEM_MB >= \d+"):
        LLM(cfg, kv_cache_mem_mb=1, skip_tokenizer_init=True)
