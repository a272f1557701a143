"""Falcon (``falcon``): RefinedWeb checkpoints (``RWForCausalLM``) and transformers' ``FalconForCausalLM`` format.

Layouts, told apart by config and keys as RTP-LLM does:
  * 7B: ``multi_query`` (one kv head), one ``input_layernorm`` feeding attention and MLP in parallel, qkv as
    ``[Q | K | V]``.
  * 40B / 180B (``new_decoder_architecture``, RW ``model_type: RefinedWeb``): GQA with ``n_head_kv`` groups,
    ``ln_attn`` + ``ln_mlp``, qkv grouped per kv head. Falcon2 has the same qkv with a single input norm.
  * MHA without ``multi_query``: per-head interleaved qkv; ``parallel_attn: false`` gives a sequential block.
LayerNorm, exact GELU, NeoX rope, no biases unless ``bias``. ALiBi Falcons (falcon-rw) are not supported.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.fused_qkv import grouped, per_head_interleaved
from rtp_mm.llm.models.hf_config import activation, get, rope_spec
from rtp_mm.llm.models.weights import Src, WeightTable

P = "transformer.h.{i}."


def _kv_heads(config: dict[str, Any], heads: int, new_arch: bool) -> int:
    if new_arch:
        return int(get(config, "num_kv_heads", "n_head_kv", default=1))
    return 1 if config.get("multi_query", True) else heads


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    if config.get("alibi"):
        raise CheckpointError("config.json alibi=true (falcon-rw) is not supported for falcon; rotary Falcons only")
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", "n_head", required=True))
    head_dim = hidden // heads
    new_arch = bool(config.get("new_decoder_architecture")) or config.get("model_type") == "RefinedWeb"
    kv_heads = _kv_heads(config, heads, new_arch)
    parallel = bool(config.get("parallel_attn", True))
    two_norms = P.format(i=0) + "ln_attn.weight" in keys
    bias = bool(config.get("bias", False))
    tied = "lm_head.weight" not in keys or bool(config.get("tie_word_embeddings", True))
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "num_hidden_layers", "n_layer", required=True)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(get(config, "ffn_hidden_size", default=4 * hidden)),
        norm="layer",
        norm_eps=float(get(config, "layer_norm_epsilon", default=1e-5)),
        norm_bias=True,
        activation=activation(config.get("activation"), default="gelu"),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        position="rope",
        rope=rope_spec(config, head_dim),
        parallel_residual=parallel,
        shared_input_norm=parallel and not two_norms,
        tie_word_embeddings=tied,
        default_max_seq_len=int(get(config, "max_position_embeddings", default=2048)),
    )
    if new_arch:
        qkv = grouped(heads, kv_heads, head_dim)
    elif kv_heads == heads:
        qkv = per_head_interleaved(heads, head_dim)
    else:
        qkv = None  # multi-query: already [Q | K | V]
    in_norm, post_norm = ("ln_attn", "ln_mlp") if two_norms else ("input_layernorm", "post_attention_layernorm")
    table: WeightTable = {
        "embed.weight": "transformer.word_embeddings.weight",
        "layers.{i}.input_norm.weight": P + in_norm + ".weight",
        "layers.{i}.input_norm.bias": P + in_norm + ".bias",
        "layers.{i}.attn.qkv.weight": Src(P + "self_attention.query_key_value.weight", qkv),
        "layers.{i}.attn.qkv.bias": Src(P + "self_attention.query_key_value.bias", qkv),
        "layers.{i}.attn.o.weight": P + "self_attention.dense.weight",
        "layers.{i}.attn.o.bias": P + "self_attention.dense.bias",
        "layers.{i}.post_norm.weight": P + post_norm + ".weight",
        "layers.{i}.post_norm.bias": P + post_norm + ".bias",
        "layers.{i}.mlp.up.weight": P + "mlp.dense_h_to_4h.weight",
        "layers.{i}.mlp.up.bias": P + "mlp.dense_h_to_4h.bias",
        "layers.{i}.mlp.down.weight": P + "mlp.dense_4h_to_h.weight",
        "layers.{i}.mlp.down.bias": P + "mlp.dense_4h_to_h.bias",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    }
    drop = (r"lm_head\.weight",) if tied else ()
    return FamilyModel(spec=spec, table=table, drop=drop)


FAMILIES = (
    Family(
        "falcon",
        ("falcon",),
        build,
        architectures={"FalconForCausalLM": "falcon", "RWForCausalLM": "falcon"},
        hf_model_types={"falcon": "falcon", "RefinedWeb": "falcon", "RefinedWebModel": "falcon"},
    ),
)
