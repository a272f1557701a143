"""The real built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm_testing.oracle import assert_close_to_reference, hf_greedy

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "List three prime numbers and explain why they are prime."},
    ],
]


@pytest.mark.slow
def test_greedy_chat_matches_hf(default_llm, default_hf_model):
    prompts = [default_llm.chat_ids(chat) for chat in CHATS]
    outs = default_llm.generate(prompts, GenerateConfig(max_new_tokens=64, top_k=1, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(default_hf_model, prompt, 64)


def test_chat_template_and_eos(default_llm):
    out = default_llm.chat(CHATS[0], GenerateConfig(max_new_tokens=64, top_k=1))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by the checkpoint's EOS, not the length limit
    assert out.aux_info["output_len"] == len(out.token_ids)
    assert out.text == default_llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_weights_are_dequantized_like_hf(default_llm, default_hf_model):
    ours = default_llm.client.model.layers[0].attn.qkv.packed.to_dense()  # fp32 weights live oneDNN-packed
    hf = default_hf_model.model.layers[0].self_attn
    expected = torch.cat([hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_half_weight_storage_stays_close_to_fp32(default_llm, default_hf_model):
    """WEIGHT_TYPE=FP16 on CPU stores weights in fp16 (activations fp32): half the weight memory, near-fp32 output."""
    from rtp_mm import LLM, ModelConfig

    with LLM(ModelConfig(weight_type="FP16"), kv_cache_mem_mb=128) as llm16:
        from rtp_mm.llm.models.transforms import resident_weight_bytes

        fp32_bytes = 4 * sum(p.numel() for p in default_hf_model.parameters())  # the plain fp32 weights
        assert resident_weight_bytes(llm16.client.model) < 0.52 * fp32_bytes
        cfg = GenerateConfig(max_new_tokens=32, top_k=1, logprobs=1, ignore_eos=True)
        prompts = [default_llm.chat_ids(chat) for chat in CHATS]
        ref = default_llm.generate(prompts, cfg)
        half = llm16.generate(prompts, cfg)
        assert_close_to_reference(ref, half, same_prefix=8, max_mean_diff=0.05)
