"""falcon: parity with HF FalconForCausalLM for the RefinedWeb 7B and 40B layouts (and two HF-format variants)."""

from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)

# name -> (HF config kwargs, config.json as that release ships it)
CASES = {
    # tiiuae/falcon-7b as first released (RWForCausalLM, remote code): MQA, one input_layernorm.
    "rw_7b": (
        dict(num_attention_heads=4, multi_query=True, new_decoder_architecture=False, parallel_attn=True),
        {
            "alibi": False,
            "apply_residual_connection_post_layernorm": False,
            "architectures": ["RWForCausalLM"],
            "bias": False,
            "bos_token_id": 11,
            "eos_token_id": 11,
            "hidden_size": 64,
            "layer_norm_epsilon": 1e-5,
            "model_type": "RefinedWebModel",
            "multi_query": True,
            "n_head": 4,
            "n_layer": 2,
            "parallel_attn": True,
            "vocab_size": VOCAB,
        },
    ),
    # tiiuae/falcon-40b as first released: n_head_kv groups, ln_attn + ln_mlp, grouped qkv.
    "rw_40b": (
        dict(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True),
        {
            "alibi": False,
            "apply_residual_connection_post_layernorm": False,
            "architectures": ["RWForCausalLM"],
            "bias": False,
            "bos_token_id": 11,
            "eos_token_id": 11,
            "hidden_size": 64,
            "layer_norm_epsilon": 1e-5,
            "model_type": "RefinedWeb",
            "n_head": 8,
            "n_head_kv": 2,
            "n_layer": 2,
            "parallel_attn": True,
            "vocab_size": VOCAB,
        },
    ),
    # falcon-11B style (transformers format): grouped qkv with a single input norm.
    "hf_new_arch_one_norm": (
        dict(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1),
        None,
    ),
    # MHA (no multi_query), sequential block, biases: per-head interleaved qkv.
    "hf_mha_sequential": (
        dict(num_attention_heads=4, multi_query=False, parallel_attn=False, bias=True, new_decoder_architecture=False),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_falcon(tmp_path, case):
    hf_kwargs, release = CASES[case]
    torch.manual_seed(51)
    cfg = FalconConfig(**COMMON, **hf_kwargs)
    model = perturb(FalconForCausalLM(cfg).eval(), seed=51)
    tensors = dict(model.state_dict())
    if release is None:
        release = {**cfg.to_dict(), "architectures": ["FalconForCausalLM"]}
    else:
        # The RW exports store the (tied) head as its own tensor.
        tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"]
    path = write_checkpoint(tmp_path / case, tensors, release)
    with tiny_llm(path, "falcon") as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=52)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)
