"""Baichuan / Baichuan2 (MODEL_TYPE baichuan): the four golden checkpoints of the original implementations (7B RoPE,
13B ALiBi with a non-power-of-two head count, Baichuan2 NormHead on both), and tiny random HF Llamas written in the
Baichuan-7B / Baichuan2-7B layouts (fused ``W_pack``; Baichuan2's ``lm_head`` stored un-normalised)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtp_mm import GenerateConfig
from rtp_mm.errors import CheckpointError
from rtp_mm_testing.golden_legacy import check_golden, golden_case
from rtp_mm_testing.oracle import TINY_LLAMA, check_parity, hf_greedy, random_prompts, tiny_llama, tiny_llm
from rtp_mm_testing.original_layout import hf_state, inv_freq, save_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
HEADS = TINY_LLAMA["num_attention_heads"]


@pytest.mark.parametrize("case", ["baichuan_7b", "baichuan_13b", "baichuan2_7b", "baichuan2_13b"])
def test_golden(case):
    ckpt, inputs, expected = golden_case(case)
    with tiny_llm(ckpt, "baichuan", max_seq_len=256) as llm:
        check_golden(llm, inputs, expected)


def _w_pack_state(model: torch.nn.Module, rotary_buffers: bool) -> dict[str, torch.Tensor]:
    sd = hf_state(model)
    head_dim = model.config.hidden_size // HEADS
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "W_pack.weight"] = torch.cat([sd.pop(p + f"{x}_proj.weight") for x in "qkv"])
        if rotary_buffers:  # Baichuan-7B saved its rotary table per layer
            sd[p + "rotary_emb.inv_freq"] = inv_freq(head_dim)
    return sd


def _config(model: torch.nn.Module, **fields) -> dict:
    cfg = model.config
    return {
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "model_type": "baichuan",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": 0,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
        **fields,
    }


def test_baichuan_7b_layout_matches_llama(tmp_path):
    model = tiny_llama(num_key_value_heads=HEADS, seed=21)
    config = _config(model, architectures=["BaiChuanForCausalLM"], max_position_embeddings=4096)
    config["auto_map"] = {k: v.replace("Baichuan", "BaiChuan") for k, v in config["auto_map"].items()}
    path = save_checkpoint(tmp_path / "baichuan", _w_pack_state(model, rotary_buffers=True), config)
    with tiny_llm(path, "baichuan") as llm:
        prompts = random_prompts(TINY_LLAMA["vocab_size"], LENGTHS, seed=22)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_baichuan2_7b_normhead_matches_llama_with_normalised_head(tmp_path):
    """The oracle's head holds unit rows; the checkpoint stores them rescaled by arbitrary per-row factors, as a
    trained NormHead does. Only row normalisation at load reproduces the oracle."""
    model = tiny_llama(num_key_value_heads=HEADS, seed=23)
    with torch.no_grad():
        model.lm_head.weight.copy_(F.normalize(model.lm_head.weight, dim=-1))
    sd = _w_pack_state(model, rotary_buffers=False)
    scale = torch.empty(sd["lm_head.weight"].shape[0], 1).uniform_(0.2, 5.0, generator=torch.Generator().manual_seed(1))
    sd["lm_head.weight"] = sd["lm_head.weight"] * scale
    config = _config(
        model,
        architectures=["BaichuanForCausalLM"],
        tokenizer_class="BaichuanTokenizer",
        max_position_embeddings=4096,
        model_max_length=4096,
        z_loss_weight=0,
        _from_model_config=True,
    )
    path = save_checkpoint(tmp_path / "baichuan2", sd, config, {"user_token_id": 195, "assistant_token_id": 196})
    with tiny_llm(path, "baichuan") as llm:
        prompts = random_prompts(TINY_LLAMA["vocab_size"], LENGTHS, seed=24)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_llama_model_type_serves_a_w_pack_checkpoint(tmp_path):
    """RTP-LLM's llama loader recognises Baichuan's W_pack; MODEL_TYPE=llama reads the same checkpoint."""
    model = tiny_llama(num_key_value_heads=HEADS, seed=25)
    config = _config(model, architectures=["BaiChuanForCausalLM"], max_position_embeddings=4096)
    path = save_checkpoint(tmp_path / "baichuan", _w_pack_state(model, rotary_buffers=True), config)
    with tiny_llm(path, "llama") as llm:
        check_parity(llm, model, random_prompts(TINY_LLAMA["vocab_size"], [6, 14], seed=26), max_new_tokens=8)


def test_baichuan_13b_in_llama_layout_keeps_alibi(tmp_path):
    """A converted checkpoint (q/k/v_proj instead of W_pack) still follows its config: no max_position_embeddings
    means ALiBi, so it must NOT match a RoPE Llama with the same weights, and must match the W_pack original."""
    model = tiny_llama(num_key_value_heads=HEADS, seed=27)
    config = _config(model, architectures=["BaichuanForCausalLM"], model_max_length=64)
    prompts = random_prompts(TINY_LLAMA["vocab_size"], [9, 21], seed=28)
    cfg = GenerateConfig(max_new_tokens=8, top_k=1, logprobs=3, ignore_eos=True)
    outs = []
    for name, sd in (("split", hf_state(model)), ("fused", _w_pack_state(model, rotary_buffers=False))):
        with tiny_llm(save_checkpoint(tmp_path / name, sd, config), "baichuan") as llm:
            outs.append(llm.generate(prompts, cfg))
    assert [o.logprobs for o in outs[0]] == [o.logprobs for o in outs[1]]
    assert [o.token_ids for o in outs[0]] != [hf_greedy(model, p, 8) for p in prompts]


def test_baichuan_with_neither_layout_is_a_clear_error(tmp_path):
    model = tiny_llama(num_key_value_heads=HEADS, seed=29)
    sd = {k.replace("self_attn.q_proj", "self_attn.query"): v for k, v in hf_state(model).items()}
    path = save_checkpoint(tmp_path / "baichuan", sd, _config(model, architectures=["BaichuanForCausalLM"]))
    with pytest.raises(CheckpointError, match="W_pack"):
        tiny_llm(path, "baichuan")
