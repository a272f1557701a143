"""GPT-BigCode (``gpt_bigcode``, ``wizardcoder``: StarCoder / SantaCoder / WizardCoder-15B checkpoints).

Learned absolute positions (``wpe``), LayerNorm, non-gated tanh-GELU MLP, biases everywhere. ``multi_query`` (the
default) fuses ``c_attn`` as ``[Q | K | V]`` with one kv head; without it ``c_attn`` is per-head interleaved.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.fused_qkv import per_head_interleaved
from rtp_mm.llm.models.hf_config import activation, get
from rtp_mm.llm.models.weights import Src, WeightTable

P = "transformer.h.{i}."

# Attention-mask buffers some exports save next to the weights.
DROP = (r"transformer\.bias", r"transformer\.h\.\d+\.attn\.(masked_)?bias")


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    hidden = int(get(config, "n_embd", "hidden_size", required=True))
    heads = int(get(config, "n_head", "num_attention_heads", required=True))
    multi_query = bool(config.get("multi_query", True))
    positions = int(get(config, "n_positions", "max_position_embeddings", default=8192))
    tied = "lm_head.weight" not in keys or bool(config.get("tie_word_embeddings", True))
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "n_layer", "num_hidden_layers", required=True)),
        num_heads=heads,
        num_kv_heads=1 if multi_query else heads,
        head_dim=hidden // heads,
        intermediate_size=int(get(config, "n_inner", default=4 * hidden)),
        norm="layer",
        norm_eps=float(get(config, "layer_norm_epsilon", default=1e-5)),
        norm_bias=True,
        activation=activation(config.get("activation_function"), default="gelu_pytorch_tanh"),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position="learned",
        max_position_embeddings=positions,
        tie_word_embeddings=tied,
        attn_scale=None if config.get("scale_attn_weights", True) else 1.0,
        default_max_seq_len=positions,
    )
    qkv_w: str | Src = P + "attn.c_attn.weight"
    qkv_b: str | Src = P + "attn.c_attn.bias"
    if not multi_query:
        qkv = per_head_interleaved(heads, spec.head_dim)
        qkv_w, qkv_b = Src(P + "attn.c_attn.weight", qkv), Src(P + "attn.c_attn.bias", qkv)
    table: WeightTable = {
        "embed.weight": "transformer.wte.weight",
        "pos_embed.weight": "transformer.wpe.weight",
        "layers.{i}.input_norm.weight": P + "ln_1.weight",
        "layers.{i}.input_norm.bias": P + "ln_1.bias",
        "layers.{i}.attn.qkv.weight": qkv_w,
        "layers.{i}.attn.qkv.bias": qkv_b,
        "layers.{i}.attn.o.weight": P + "attn.c_proj.weight",
        "layers.{i}.attn.o.bias": P + "attn.c_proj.bias",
        "layers.{i}.post_norm.weight": P + "ln_2.weight",
        "layers.{i}.post_norm.bias": P + "ln_2.bias",
        "layers.{i}.mlp.up.weight": P + "mlp.c_fc.weight",
        "layers.{i}.mlp.up.bias": P + "mlp.c_fc.bias",
        "layers.{i}.mlp.down.weight": P + "mlp.c_proj.weight",
        "layers.{i}.mlp.down.bias": P + "mlp.c_proj.bias",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    }
    drop = DROP + ((r"lm_head\.weight",) if tied else ())
    return FamilyModel(spec=spec, table=table, drop=drop)


FAMILIES = (
    Family(
        "gpt_bigcode",
        ("gpt_bigcode", "wizardcoder"),
        build,
        architectures={"GPTBigCodeForCausalLM": "gpt_bigcode"},
        hf_model_types={"gpt_bigcode": "gpt_bigcode"},
    ),
)
