"""BLOOM (``bloom``, ``sgpt_bloom``, and the ``sgpt_bloom_vector`` embedding model's backbone).

ALiBi instead of positions, a LayerNorm right after the word embedding, per-head interleaved ``query_key_value``,
tanh GELU, biases everywhere. Checkpoints are saved from ``BloomForCausalLM`` (``transformer.`` prefix, optional
``lm_head``) or from ``BloomModel`` (no prefix, no head: SGPT); both load, the head falling back to the embedding.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.fused_qkv import per_head_interleaved
from rtp_mm.llm.models.hf_config import get
from rtp_mm.llm.models.weights import Src, WeightTable, weight_and_bias

P = "h.{i}."


def bloom_spec(config: dict[str, Any], keys: set[str]) -> DecoderSpec:
    if config.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError("config.json apply_residual_connection_post_layernorm=true is not supported for bloom")
    hidden = int(get(config, "hidden_size", "n_embed", required=True))
    heads = int(get(config, "n_head", "num_attention_heads", required=True))
    has_head = any(k.removeprefix("transformer.") == "lm_head.weight" for k in keys)
    return DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "n_layer", "num_hidden_layers", required=True)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        norm="layer",
        norm_eps=float(get(config, "layer_norm_epsilon", default=1e-5)),
        norm_bias=True,
        activation="gelu_tanh",  # bloom_gelu_forward is the tanh approximation
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position="alibi",
        embedding_norm=True,
        tie_word_embeddings=not has_head or bool(config.get("tie_word_embeddings", True)),
        default_max_seq_len=int(get(config, "seq_length", default=2048)),
    )


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    spec = bloom_spec(config, keys)
    qkv = per_head_interleaved(spec.num_heads, spec.head_dim)
    table: WeightTable = {
        "embed.weight": "word_embeddings.weight",
        "layers.{i}.attn.qkv.weight": Src(P + "self_attention.query_key_value.weight", qkv),
        "layers.{i}.attn.qkv.bias": Src(P + "self_attention.query_key_value.bias", qkv),
        **weight_and_bias(
            {
                "embed_norm": "word_embeddings_layernorm",
                "layers.{i}.input_norm": P + "input_layernorm",
                "layers.{i}.attn.o": P + "self_attention.dense",
                "layers.{i}.post_norm": P + "post_attention_layernorm",
                "layers.{i}.mlp.up": P + "mlp.dense_h_to_4h",
                "layers.{i}.mlp.down": P + "mlp.dense_4h_to_h",
                "norm": "ln_f",
            }
        ),
        "lm_head.weight": "lm_head.weight",
    }
    drop = (r"lm_head\.weight",) if spec.tie_word_embeddings else ()
    return FamilyModel(spec=spec, table=table, drop=drop, rename=_strip_transformer)


def _strip_transformer(name: str) -> str:
    return name.removeprefix("transformer.")


FAMILIES = (
    Family(
        "bloom",
        ("bloom", "sgpt_bloom"),
        build,
        architectures={"BloomForCausalLM": "bloom", "BloomModel": "bloom"},
        hf_model_types={"bloom": "bloom"},
        layout="bloom",
    ),
    # SGPT-BLOOM: the same backbone, position-weighted mean pooling of the final hidden states (engine/embedding.py).
    Family("sgpt_bloom_vector", ("sgpt_bloom_vector",), build, layout="bloom", embedding=True),
)
