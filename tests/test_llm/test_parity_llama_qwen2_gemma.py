"""Parity of the engine against HF transformers for tiny random llama / qwen_2 / gemma checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM

from rtp_mm_testing.oracle import check_parity, random_prompts, save_hf, tiny_llama, tiny_llm, tiny_qwen2

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]

ROPE_CASES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _llama(tmp_path, tie: bool, kv_heads: int, rope: dict | None, max_pos: int = 256):
    path = tmp_path / "llama"
    model = tiny_llama(
        path, num_key_value_heads=kv_heads, max_position_embeddings=max_pos, tie_word_embeddings=tie, rope_scaling=rope
    )
    return model, path


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_llama_single_and_concurrent(tmp_path, tie, kv_heads):
    model, path = _llama(tmp_path, tie, kv_heads, None)
    with tiny_llm(path, "llama") as llm:
        prompts = random_prompts(320, LENGTHS)
        check_parity(llm, model, prompts[:1])  # one request alone
        check_parity(llm, model, prompts)  # eight different prompts batched together


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_llama_rope_scaling(tmp_path, kind):
    # A small max_position_embeddings so the dynamic scaling really kicks in during generation.
    model, path = _llama(tmp_path, False, 2, ROPE_CASES[kind], max_pos=32)
    with tiny_llm(path, "llama") as llm:
        prompts = random_prompts(320, [12, 30, 7, 25])
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_qwen2(tmp_path):
    path = tmp_path / "qwen2"
    model = tiny_qwen2(path)
    with tiny_llm(path, "qwen_2") as llm:
        prompts = random_prompts(300, LENGTHS, seed=3)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_gemma(tmp_path):
    torch.manual_seed(3)
    cfg = GemmaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=512,
    )
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero norm weights so the (1 + w) convention is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    path = save_hf(model, tmp_path / "gemma")
    with tiny_llm(path, "gemma") as llm:
        prompts = random_prompts(300, LENGTHS, seed=4)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_llama_chunked_prefill_and_preemption(tmp_path):
    """A tiny token budget forces chunked prefill mixed with decodes; a 40-block cache forces preemption and
    recomputation. Neither may change greedy results."""
    model, path = _llama(tmp_path, False, 2, None)
    prompts = random_prompts(320, LENGTHS, seed=7)
    with tiny_llm(path, "llama", max_num_batched_tokens=7) as llm:
        check_parity(llm, model, prompts)
    with tiny_llm(path, "llama", kv_cache_blocks=40, max_seq_len=128) as llm:
        check_parity(llm, model, prompts)
        stats = llm.stats()
        assert stats["free_blocks"] == stats["num_blocks"] == 40
        assert stats["num_preemptions"] > 0
