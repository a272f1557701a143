"""The HF Llama checkpoint layout (``model.layers.N.self_attn.q_proj`` ...) and its spec reader, shared by every
family that stores Llama names: llama and its renamings, gemma, qwen_2, baichuan, starcoder2 and llava's LMs."""

from __future__ import annotations

from typing import Any

from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.hf_config import activation, get, rope_spec
from rtp_mm.llm.models.weights import Cat, WeightTable

P = "model.layers.{i}."

TABLE: WeightTable = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.input_norm.weight": P + "input_layernorm.weight",
    "layers.{i}.attn.qkv.weight": Cat(*(P + f"self_attn.{x}_proj.weight" for x in "qkv")),
    "layers.{i}.attn.qkv.bias": Cat(*(P + f"self_attn.{x}_proj.bias" for x in "qkv")),
    "layers.{i}.attn.o.weight": P + "self_attn.o_proj.weight",
    "layers.{i}.attn.o.bias": P + "self_attn.o_proj.bias",
    "layers.{i}.post_norm.weight": P + "post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_up.weight": Cat(P + "mlp.gate_proj.weight", P + "mlp.up_proj.weight"),
    "layers.{i}.mlp.gate_up.bias": Cat(P + "mlp.gate_proj.bias", P + "mlp.up_proj.bias"),
    "layers.{i}.mlp.down.weight": P + "mlp.down_proj.weight",
    "layers.{i}.mlp.down.bias": P + "mlp.down_proj.bias",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

DROP = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def llama_spec(config: dict[str, Any], keys: set[str], **overrides: Any) -> DecoderSpec:
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", required=True))
    head_dim = int(get(config, "head_dim", default=hidden // heads))
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in keys
    fields: dict[str, Any] = dict(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "num_hidden_layers", required=True)),
        num_heads=heads,
        num_kv_heads=int(get(config, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        intermediate_size=int(get(config, "intermediate_size", required=True)),
        norm="rms",
        norm_eps=float(get(config, "rms_norm_eps", "layer_norm_eps", default=1e-6)),
        activation=activation(get(config, "hidden_act", "hidden_activation")),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in keys,
        o_bias="model.layers.0.self_attn.o_proj.bias" in keys,
        mlp_bias="model.layers.0.mlp.down_proj.bias" in keys,
        position="rope",
        rope=rope_spec(config, head_dim),
        tie_word_embeddings=tied,
        # RTP-LLM's Llama reads max_sequence_length (default 2048), not max_position_embeddings.
        default_max_seq_len=int(get(config, "max_sequence_length", default=2048)),
    )
    fields.update(overrides)
    return DecoderSpec(**fields)
