"""phi: parity with HF PhiForCausalLM for the transformers layout and the older phi-1.5 exports."""

from __future__ import annotations

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300
LAYERS = 2


def _phi(partial: float, kv_heads: int = 4) -> PhiForCausalLM:
    torch.manual_seed(71)
    cfg = PhiConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial},
    )
    return perturb(PhiForCausalLM(cfg).eval(), seed=71)


def _legacy_tensors(model: PhiForCausalLM, layout: str) -> dict[str, torch.Tensor]:
    """The HF weights under the mixformer-sequential (``layers.N``) or phi-msft names, q/k/v fused as Wqkv."""
    sd = model.state_dict()
    if layout == "mixformer":
        embed, block, ln_f, head = (
            "layers.0.wte.weight",
            "layers.{n}.",
            f"layers.{LAYERS + 1}.ln.",
            f"layers.{LAYERS + 1}.linear.",
        )
    else:
        embed, block, ln_f, head = "transformer.embd.wte.weight", "transformer.h.{i}.", "lm_head.ln.", "lm_head.linear."
    out = {embed: sd["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", block.format(n=i + 1, i=i)
        for kind in ("weight", "bias"):
            out[dst + f"mixer.Wqkv.{kind}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[dst + f"mixer.out_proj.{kind}"] = sd[src + f"self_attn.dense.{kind}"]
            out[dst + f"ln.{kind}"] = sd[src + f"input_layernorm.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
        out[dst + "mixer.rotary_emb.inv_freq"] = torch.zeros(4)  # saved by the remote code, skipped on load
    for kind in ("weight", "bias"):
        out[ln_f + kind] = sd[f"model.final_layernorm.{kind}"]
        out[head + kind] = sd[f"lm_head.{kind}"]
    return out


def _legacy_config(layout: str, rotary_dim: int) -> dict:
    """config.json of microsoft/phi-1_5 as first released (mixformer-sequential) or its later phi-msft revision."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["MixFormerSequentialForCausalLM" if layout == "mixformer" else "PhiForCausalLM"],
        "layer_norm_epsilon": 1e-5,
        "model_type": "mixformer-sequential" if layout == "mixformer" else "phi-msft",
        "n_embd": 64,
        "n_head": 4,
        "n_inner": 128,
        "n_layer": LAYERS,
        "n_positions": 256,
        "rotary_dim": rotary_dim,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    }


def _check(path, model):
    with tiny_llm(path, "phi") as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=72)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_phi_transformers_layout(tmp_path, kv_heads):
    model = _phi(partial=0.4, kv_heads=kv_heads)  # phi-2's factor: 6 of 16 dims rotated
    release = {  # microsoft/phi-2 config.json (transformers 4.37 names)
        "architectures": ["PhiForCausalLM"],
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "hidden_act": "gelu_new",
        "hidden_size": 64,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "model_type": "phi",
        "num_attention_heads": 4,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": kv_heads,
        "partial_rotary_factor": 0.4,
        "qk_layernorm": False,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    }
    _check(write_checkpoint(tmp_path / "phi", model.state_dict(), release), model)


@pytest.mark.parametrize("layout", ["mixformer", "phi_msft"])
def test_phi_legacy_layouts(tmp_path, layout):
    model = _phi(partial=0.5)  # rotary_dim 8 of head_dim 16
    path = write_checkpoint(tmp_path / layout, _legacy_tensors(model, layout), _legacy_config(layout, rotary_dim=8))
    _check(path, model)
