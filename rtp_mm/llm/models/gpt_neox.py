"""GPT-NeoX (``gpt_neox``: Pythia, GPT-NeoX-20B, RedPajama-INCITE ...).

Parallel residual ``x + attn(ln1 x) + mlp(ln2 x)`` (``use_parallel_residual``, default on), NeoX rope over the first
``rotary_pct`` of each head, per-head interleaved ``query_key_value``, LayerNorm, GELU, untied ``embed_out`` head.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.fused_qkv import per_head_interleaved
from rtp_mm.llm.models.hf_config import activation, get, rope_spec
from rtp_mm.llm.models.weights import Src, WeightTable, weight_and_bias

P = "gpt_neox.layers.{i}."

# Buffers older exports save: the causal mask, its fill value and the rotary frequencies.
DROP = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", required=True))
    head_dim = hidden // heads
    # Release configs say rotary_pct / rotary_emb_base; transformers 5 writes rope_parameters.
    partial = get(config, "rotary_pct", default=None)
    if partial is None:
        partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25)
    rope_config = dict(config)
    if "rotary_emb_base" in config:
        rope_config.setdefault("rope_theta", config["rotary_emb_base"])
    attn_bias = bool(config.get("attention_bias", True))
    tied = bool(config.get("tie_word_embeddings", False))
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "num_hidden_layers", required=True)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=int(get(config, "intermediate_size", default=4 * hidden)),
        norm="layer",
        norm_eps=float(get(config, "layer_norm_eps", default=1e-5)),
        norm_bias=True,
        activation=activation(config.get("hidden_act"), default="gelu"),
        gated_mlp=False,
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        mlp_bias=True,
        position="rope",
        rope=rope_spec(rope_config, head_dim, rotary_dim=int(head_dim * float(partial))),
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        tie_word_embeddings=tied,
        default_max_seq_len=int(get(config, "max_position_embeddings", default=4096)),
    )
    qkv = per_head_interleaved(heads, head_dim)
    table: WeightTable = {
        "embed.weight": "gpt_neox.embed_in.weight",
        "layers.{i}.attn.qkv.weight": Src(P + "attention.query_key_value.weight", qkv),
        "layers.{i}.attn.qkv.bias": Src(P + "attention.query_key_value.bias", qkv),
        **weight_and_bias(
            {
                "layers.{i}.input_norm": P + "input_layernorm",
                "layers.{i}.attn.o": P + "attention.dense",
                "layers.{i}.post_norm": P + "post_attention_layernorm",
                "layers.{i}.mlp.up": P + "mlp.dense_h_to_4h",
                "layers.{i}.mlp.down": P + "mlp.dense_4h_to_h",
                "norm": "gpt_neox.final_layer_norm",
            }
        ),
        "lm_head.weight": "embed_out.weight",
    }
    drop = DROP + ((r"embed_out\.weight",) if tied else ())
    return FamilyModel(spec=spec, table=table, drop=drop, rename=_release_names)


def _release_names(name: str) -> str:
    """transformers 5 saves the head as ``lm_head``; the released checkpoints call it ``embed_out``."""
    return "embed_out.weight" if name == "lm_head.weight" else name


FAMILIES = (
    Family(
        "gpt_neox",
        ("gpt_neox",),
        build,
        architectures={"GPTNeoXForCausalLM": "gpt_neox"},
        hf_model_types={"gpt_neox": "gpt_neox"},
    ),
)
