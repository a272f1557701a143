"""StarCoder2 (``starcoder2``): the Llama attention graph (GQA, NeoX rope) with LayerNorm, biases on every
projection (``use_bias``), a non-gated ``c_fc``/``c_proj`` tanh-GELU MLP and a tied head. ``sliding_window`` is not
applied, as in RTP-LLM (the released window is 4096 tokens)."""

from __future__ import annotations

from typing import Any

from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import activation, get
from rtp_mm.llm.models.llama_layout import DROP, P, llama_spec
from rtp_mm.llm.models.weights import Cat, WeightTable, weight_and_bias

TABLE: WeightTable = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn.qkv.weight": Cat(*(P + f"self_attn.{x}_proj.weight" for x in "qkv")),
    "layers.{i}.attn.qkv.bias": Cat(*(P + f"self_attn.{x}_proj.bias" for x in "qkv")),
    **weight_and_bias(
        {
            "layers.{i}.input_norm": P + "input_layernorm",
            "layers.{i}.attn.o": P + "self_attn.o_proj",
            "layers.{i}.post_norm": P + "post_attention_layernorm",
            "layers.{i}.mlp.up": P + "mlp.c_fc",
            "layers.{i}.mlp.down": P + "mlp.c_proj",
            "norm": "model.norm",
        }
    ),
    "lm_head.weight": "lm_head.weight",
}


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    bias = bool(config.get("use_bias", True))
    tied = "lm_head.weight" not in keys or bool(config.get("tie_word_embeddings", True))
    spec = llama_spec(
        config,
        keys,
        norm="layer",
        norm_eps=float(get(config, "norm_epsilon", "layer_norm_epsilon", default=1e-5)),
        norm_bias=bias,
        activation=activation(get(config, "hidden_act", "activation_function"), default="gelu_pytorch_tanh"),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        default_max_seq_len=int(get(config, "max_position_embeddings", default=4096)),
    )
    drop = DROP + ((r"lm_head\.weight",) if tied else ())
    return FamilyModel(spec=spec, table=TABLE, drop=drop)


FAMILIES = (
    Family(
        "starcoder2",
        ("starcoder2",),
        build,
        architectures={"Starcoder2ForCausalLM": "starcoder2"},
        hf_model_types={"starcoder2": "starcoder2"},
    ),
)
