"""Llama family: HF ``LlamaForCausalLM`` layout (also Mistral-style configs, and the GGUF llama architecture once the
reader has mapped its names). GQA, rope scaling linear/dynamic/yarn/llama3, tied or untied head, optional biases
(detected from the checkpoint keys, as RTP-LLM does for InternLM)."""

from __future__ import annotations

import math
from typing import Any

from rtp_mm.llm.models import llama_variants
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import FamilyModel
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


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    if "model.layers.0.self_attn.W_pack.weight" in keys:  # a Baichuan checkpoint: RTP-LLM's Llama accepts W_pack
        from rtp_mm.llm.models import baichuan

        return baichuan.build(config, keys, model_type)
    spec = llama_spec(config, keys, **llama_variants.overrides(config))
    drop = DROP + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())
    return FamilyModel(spec=spec, table=TABLE, drop=drop)


def gemma_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    """Gemma: GeGLU (tanh GELU), embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, tied head, head_dim 256."""
    from rtp_mm.llm.models.weights import Src, plus_one

    hidden = int(get(config, "hidden_size", required=True))
    spec = llama_spec(
        config,
        keys | {"lm_head.weight"},
        activation=activation(get(config, "hidden_activation", "hidden_act"), default="gelu_pytorch_tanh"),
        embedding_scale=math.sqrt(hidden),
        tie_word_embeddings=True,
        default_max_seq_len=int(get(config, "max_sequence_length", default=2048)),
    )
    table = dict(TABLE)
    table["layers.{i}.input_norm.weight"] = Src(P + "input_layernorm.weight", plus_one)
    table["layers.{i}.post_norm.weight"] = Src(P + "post_attention_layernorm.weight", plus_one)
    table["norm.weight"] = Src("model.norm.weight", plus_one)
    return FamilyModel(spec=spec, table=table, drop=DROP + (r"lm_head\.weight",))


def qwen2_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    """Qwen2: the Llama graph with q/k/v biases; sliding window ignored (as RTP-LLM); default max_seq_len 8192."""
    spec = llama_spec(config, keys, qkv_bias=True, default_max_seq_len=8192)
    drop = DROP + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())
    return FamilyModel(spec=spec, table=TABLE, drop=drop, rename=_strip_language_model)


def _strip_language_model(name: str) -> str:
    return name.removeprefix("language_model.")
