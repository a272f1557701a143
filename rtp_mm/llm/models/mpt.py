"""MPT (``mpt``: mosaicml/mpt-7b and relatives, MPTForCausalLM remote-code checkpoints and the transformers port).

ALiBi (no positional embedding), bias-free LayerNorm and projections, ``Wqkv`` fused as ``[Q | K | V]``, exact GELU
MLP of ``expansion_ratio`` x ``d_model``, head tied to ``wte``. Options the released models leave off (clip_qkv,
qk_ln, prefix-LM, logit_scale, grouped attention, learned positions) are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import get
from rtp_mm.llm.models.weights import WeightTable

P = "transformer.blocks.{i}."

TABLE: WeightTable = {
    "embed.weight": "transformer.wte.weight",
    "layers.{i}.input_norm.weight": P + "norm_1.weight",
    "layers.{i}.attn.qkv.weight": P + "attn.Wqkv.weight",
    "layers.{i}.attn.o.weight": P + "attn.out_proj.weight",
    "layers.{i}.post_norm.weight": P + "norm_2.weight",
    "layers.{i}.mlp.up.weight": P + "ffn.up_proj.weight",
    "layers.{i}.mlp.down.weight": P + "ffn.down_proj.weight",
    "norm.weight": "transformer.norm_f.weight",
}


def _check_supported(config: dict[str, Any], attn: dict[str, Any]) -> None:
    # (field, value, what the released models and the transformers port use)
    checks = [
        ("attn_config.alibi", attn.get("alibi", True), True),
        ("attn_config.alibi_bias_max", attn.get("alibi_bias_max", 8), 8),
        ("attn_config.clip_qkv", attn.get("clip_qkv"), None),
        ("attn_config.qk_ln", bool(attn.get("qk_ln")), False),
        ("attn_config.prefix_lm", bool(attn.get("prefix_lm")), False),
        ("attn_config.attn_type", attn.get("attn_type", "multihead_attention"), "multihead_attention"),
        ("logit_scale", config.get("logit_scale"), None),
        ("no_bias", config.get("no_bias", True), True),
    ]
    bad = [f"{name}={value!r} (supported: {ok!r})" for name, value, ok in checks if value != ok]
    if bad:
        raise CheckpointError(f"config.json {'; '.join(bad)} is not supported for mpt")


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    attn = dict(config.get("attn_config") or {})
    _check_supported(config, attn)
    hidden = int(get(config, "d_model", "hidden_size", required=True))
    heads = int(get(config, "n_heads", "num_attention_heads", required=True))
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "n_layers", "num_hidden_layers", required=True)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(config.get("expansion_ratio", 4) * hidden),
        norm="layer",
        norm_eps=float(get(config, "layer_norm_epsilon", default=1e-5)),
        norm_bias=False,
        activation="gelu",
        gated_mlp=False,
        position="alibi",
        tie_word_embeddings=True,
        attn_scale=attn.get("softmax_scale"),
        default_max_seq_len=8192,  # RTP-LLM's class default; ALiBi extrapolates past the trained max_seq_len
    )
    # The transformers port saves the tied head too; it is always wte.
    return FamilyModel(spec=spec, table=TABLE, drop=(r"lm_head\.weight",))


FAMILIES = (
    Family(
        "mpt",
        ("mpt",),
        build,
        architectures={"MPTForCausalLM": "mpt", "MptForCausalLM": "mpt"},
        hf_model_types={"mpt": "mpt"},
    ),
)
