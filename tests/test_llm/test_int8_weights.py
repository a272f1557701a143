"""WEIGHT_TYPE=INT8 (quantize_int8_weights): weight-only per-output-channel int8 applied to a built model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.kernels.linear import Int8WeightEmbedding, Int8WeightLinear
from rtp_mm.llm.models.transforms import quantize_int8_weights, resident_weight_bytes
from rtp_mm_testing.oracle import (
    assert_close_to_reference,
    check_parity,
    random_prompts,
    tiny_llama,
    tiny_llm,
    tiny_qwen2,
)

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


def _int8_llm(**kwargs) -> LLM:
    return LLM(ModelConfig(weight_type="INT8"), **kwargs)


@torch.no_grad()
def _fake_quantize_(hf_model: nn.Module, quantize_embedding: bool) -> None:
    """The oracle: replace each weight the transform quantizes by its int8-grid value (per output row)."""
    embed = hf_model.get_input_embeddings().weight
    weights = {id(m.weight): m.weight for m in hf_model.modules() if isinstance(m, nn.Linear)}
    if quantize_embedding:
        weights[id(embed)] = embed
    elif hf_model.config.tie_word_embeddings:
        weights.pop(id(embed), None)  # the tied head is the fp32 table
    for w in weights.values():
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        w.copy_(torch.round(w / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127) * scale)


@pytest.mark.parametrize(
    "model_type, tied, quantize_embedding",
    [("llama", True, True), ("llama", True, False), ("qwen_2", False, True), ("qwen_2", False, False)],
)
def test_tiny_model_matches_fake_quantized_hf(
    tmp_path: Path, model_type: str, tied: bool, quantize_embedding: bool, monkeypatch
):
    """Greedy tokens and top-5 logprobs equal HF's on the same model with int8-rounded weights (qwen2: biases)."""
    monkeypatch.setattr("rtp_mm.api.builder.can_pack", lambda model: False)  # keep nn.Linear layers for the transform
    build = tiny_llama if model_type == "llama" else tiny_qwen2
    hf = build(tmp_path, tie_word_embeddings=tied)
    with tiny_llm(tmp_path, model_type) as llm:
        model = quantize_int8_weights(llm.client.model, quantize_embedding=quantize_embedding)
        assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
        assert isinstance(model.layers[0].attn.qkv, Int8WeightLinear)
        assert isinstance(model.embed, Int8WeightEmbedding) == quantize_embedding
        assert tied or isinstance(model.lm_head, Int8WeightLinear)
        _fake_quantize_(hf, quantize_embedding)
        check_parity(llm, hf, random_prompts(hf.config.vocab_size, [5, 12]), max_new_tokens=12)


def test_default_model_int8_stays_close_to_fp32(default_llm, default_hf_model):
    """The real default model (SmolLM2-135M, tied head): the same first greedy tokens as fp32, chosen-token logprobs
    within 0.05 on average where the prefixes agree (measured 0.036), and about a quarter of the fp32 weight bytes
    (measured 0.252). ~25 s here, under the 60 s bar for ``slow``."""
    cfg = GenerateConfig(max_new_tokens=32, top_k=1, logprobs=1, ignore_eos=True)
    prompts = [default_llm.chat_ids([{"role": "user", "content": c}]) for c in CHATS]
    ref = default_llm.generate(prompts, cfg)
    with _int8_llm(kv_cache_mem_mb=128) as llm8:
        fp32_bytes = 4 * sum(p.numel() for p in default_hf_model.parameters())  # the plain fp32 weights
        assert resident_weight_bytes(llm8.client.model) <= 0.3 * fp32_bytes
        outs = llm8.generate(prompts, cfg)
    assert_close_to_reference(ref, outs, same_prefix=8, max_mean_diff=0.05)
