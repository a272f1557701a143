"""InternLM v1, XVERSE and Aquila (Llama renamings): their golden checkpoints, and tiny random HF Llamas saved under
each family's own architecture name and config.json layout (InternLM with q/k/v/o biases and per-layer rotary
buffers, Aquila2 with GQA and its own rope_theta)."""

from __future__ import annotations

import pytest

from rtp_mm.errors import CheckpointError
from rtp_mm_testing.golden_legacy import check_golden, golden_case
from rtp_mm_testing.oracle import TINY_LLAMA, check_parity, random_prompts, tiny_llama, tiny_llm
from rtp_mm_testing.original_layout import hf_state, inv_freq, randomize_biases, save_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]


@pytest.mark.parametrize("case,model_type", [("internlm_7b", "internlm"), ("xverse", "xverse"), ("aquila", "aquila")])
def test_golden(case, model_type):
    ckpt, inputs, expected = golden_case(case)
    with tiny_llm(ckpt, model_type, max_seq_len=256) as llm:
        check_golden(llm, inputs, expected)


def _common(model) -> dict:
    cfg = model.config
    return {
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def _internlm(model, rotary: dict | None = None) -> tuple[dict, dict]:
    sd = hf_state(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i in range(model.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq(head_dim)
    config = {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm.InternLMConfig",
            "AutoModel": "modeling_internlm.InternLMForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
        },
        "bias": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": 2048,
        "model_type": "internlm",
        "pad_token_id": 0,
        **_common(model),
    }
    if rotary is not None:
        config["rotary"] = rotary
    return sd, config


def _parity(tmp_path, model, sd: dict, config: dict, model_type: str, seed: int) -> None:
    path = save_checkpoint(tmp_path / model_type, sd, config)
    with tiny_llm(path, model_type) as llm:
        prompts = random_prompts(TINY_LLAMA["vocab_size"], LENGTHS, seed=seed)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_internlm_biases_match_llama(tmp_path):
    model = tiny_llama(num_key_value_heads=4, attention_bias=True, seed=31)
    randomize_biases(model)
    sd, config = _internlm(model)
    _parity(tmp_path, model, sd, config, "internlm", seed=32)


def test_internlm_rotary_config_matches_llama_rope_theta(tmp_path):
    """The Dec-2023 InternLM code's ``rotary`` dict: its base is the rope theta (dynamic NTK only beyond 2048)."""
    model = tiny_llama(num_key_value_heads=4, attention_bias=True, rope_theta=50000.0, seed=33)
    randomize_biases(model)
    sd, config = _internlm(model, rotary={"base": 50000, "type": "dynamic", "scaling_factor": 1.0})
    _parity(tmp_path, model, sd, config, "internlm", seed=34)


def test_internlm_unknown_rotary_type_is_a_clear_error(tmp_path):
    model = tiny_llama(num_key_value_heads=4, attention_bias=True, seed=35)
    sd, config = _internlm(model, rotary={"base": 10000, "type": "yarn"})
    path = save_checkpoint(tmp_path / "internlm", sd, config)
    with pytest.raises(CheckpointError, match="rotary.type"):
        tiny_llm(path, "internlm")


def test_xverse_matches_llama(tmp_path):
    model = tiny_llama(num_key_value_heads=4, seed=36)
    sd = hf_state(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i in range(model.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq(head_dim)
    config = {
        "architectures": ["XverseForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_xverse.XverseConfig",
            "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM",
        },
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "max_position_embeddings": 8192,
        "max_tokenizer_truncation": 6144,
        "model_type": "xverse",
        **_common(model),
    }
    _parity(tmp_path, model, sd, config, "xverse", seed=37)


def test_aquila2_gqa_and_rope_theta_match_llama(tmp_path):
    model = tiny_llama(num_key_value_heads=2, rope_theta=1000000.0, seed=38)
    config = {
        "architectures": ["AquilaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_aquila.AquilaConfig",
            "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM",
        },
        "bos_token_id": 100006 % TINY_LLAMA["vocab_size"],
        "eos_token_id": 100007 % TINY_LLAMA["vocab_size"],
        "max_position_embeddings": 4096,
        "model_type": "aquila",
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        **_common(model),
    }
    _parity(tmp_path, model, hf_state(model), config, "aquila", seed=39)
