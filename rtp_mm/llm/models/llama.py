"""Llama family: HF ``LlamaForCausalLM`` layout (also Mistral-style configs, and the GGUF llama architecture once the
reader has mapped its names). GQA, rope scaling linear/dynamic/yarn/llama3, tied or untied head, optional biases
(detected from the checkpoint keys, as RTP-LLM does for InternLM)."""

from __future__ import annotations

import math
from typing import Any

from rtp_mm.llm.models import baichuan, llama_variants
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import activation, get
from rtp_mm.llm.models.llama_layout import DROP, TABLE, P, llama_spec
from rtp_mm.llm.models.weights import Src, plus_one


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    if "model.layers.0.self_attn.W_pack.weight" in keys:  # a Baichuan checkpoint: RTP-LLM's Llama accepts W_pack
        return baichuan.build(config, keys, model_type)
    spec = llama_spec(config, keys, **llama_variants.overrides(config))
    drop = DROP + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())
    return FamilyModel(spec=spec, table=TABLE, drop=drop)


def gemma_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    """Gemma: GeGLU (tanh GELU), embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, tied head, head_dim 256."""
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


FAMILIES = (
    Family(
        "llama",
        ("llama", "xverse", "aquila", "internlm"),
        build,
        architectures={
            "LlamaForCausalLM": "llama",
            "YiForCausalLM": "llama",
            "XverseForCausalLM": "xverse",
            "AquilaModel": "aquila",
            "AquilaForCausalLM": "aquila",
            "InternLMForCausalLM": "internlm",
        },
        hf_model_types={"llama": "llama", "mistral": "llama", "internlm": "internlm", "xverse": "xverse"}
        | {"aquila": "aquila"},
        layout="llama",
    ),
    Family(
        "gemma", ("gemma",), gemma_build, architectures={"GemmaForCausalLM": "gemma"}, hf_model_types={"gemma": "gemma"}
    ),
    Family(
        "qwen_2",
        ("qwen_2",),
        qwen2_build,
        architectures={"Qwen2ForCausalLM": "qwen_2"},
        hf_model_types={"qwen2": "qwen_2"},
    ),
)
