"""Qwen v1 (Qwen-7B / -14B / -1.8B, ``QWenLMHeadModel``): the Llama graph under GPT-2-style names.

Differences that matter for the logits: the fused ``c_attn`` is ``[Q | K | V]`` with a bias (``c_proj`` has none
unless ``no_bias`` is false), the SwiGLU gate is ``w2`` and the up projection ``w1``, ``intermediate_size`` counts
both branches (each is half of it), ``kv_channels`` is the head dim. Beyond ``seq_length`` two inference-time tricks
switch on: dynamic NTK (``use_dynamic_ntk``: the rope base grows by ``alpha^(d/(d-2))``, alpha chosen once from the
prompt length) and logn attention (``use_logn_attn``: a query at position p >= seq_length is scaled by
``log_{seq_length}(p + 1)``).
"""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import get
from rtp_mm.llm.models.rope import RopeSpec
from rtp_mm.llm.models.weights import Cat, WeightTable

P = "transformer.h.{i}."

TABLE: WeightTable = {
    "embed.weight": "transformer.wte.weight",
    "layers.{i}.input_norm.weight": P + "ln_1.weight",
    "layers.{i}.attn.qkv.weight": P + "attn.c_attn.weight",
    "layers.{i}.attn.qkv.bias": P + "attn.c_attn.bias",
    "layers.{i}.attn.o.weight": P + "attn.c_proj.weight",
    "layers.{i}.attn.o.bias": P + "attn.c_proj.bias",
    "layers.{i}.post_norm.weight": P + "ln_2.weight",
    # gate first: the decoder computes act(gate) * up, and Qwen's gate is w2.
    "layers.{i}.mlp.gate_up.weight": Cat(P + "mlp.w2.weight", P + "mlp.w1.weight"),
    "layers.{i}.mlp.gate_up.bias": Cat(P + "mlp.w2.bias", P + "mlp.w1.bias"),
    "layers.{i}.mlp.down.weight": P + "mlp.c_proj.weight",
    "layers.{i}.mlp.down.bias": P + "mlp.c_proj.bias",
    "norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}

# Buffers some revisions saved: the rotary table and the old causal-mask constants.
DROP = (
    r"transformer\.rotary_emb\.inv_freq",
    r"transformer\.h\.\d+\.attn\.rotary_emb\.inv_freq",
    r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
)

# RTP-LLM's class defaults for MAX_SEQ_LEN=0 (QWen_7B / QWen_13B / QWen_1B8); seq_length does not change them.
DEFAULT_MAX_SEQ_LEN = {"qwen_7b": 8192, "qwen_13b": 8192, "qwen_1b8": 2048}


def qwen_spec(config: dict[str, Any], keys: set[str], model_type: str) -> DecoderSpec:
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", "n_head", required=True))
    head_dim = int(get(config, "kv_channels", default=hidden // heads))
    both_branches = int(get(config, "intermediate_size", "ffn_hidden_size", required=True))
    if both_branches % 2:
        raise CheckpointError(
            f"config.json intermediate_size={both_branches} must be even: "
            "Qwen v1 stores the widths of w1 and w2 together"
        )
    seq_length = int(get(config, "seq_length", default=8192))
    rotary_dim = int(head_dim * float(get(config, "rotary_pct", default=1.0)))
    rope = RopeSpec(
        theta=float(get(config, "rotary_emb_base", default=10000.0)),
        dim=rotary_dim if rotary_dim != head_dim else 0,
        scaling="qwen_ntk" if config.get("use_dynamic_ntk") else "none",
        original_max_position=seq_length,
    )
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in keys
    return DecoderSpec(
        vocab_size=int(get(config, "vocab_size", "padded_vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "num_hidden_layers", "n_layer", required=True)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=both_branches // 2,
        norm="rms",
        norm_eps=float(get(config, "layer_norm_epsilon", default=1e-6)),
        activation="silu",
        qkv_bias="transformer.h.0.attn.c_attn.bias" in keys,
        o_bias="transformer.h.0.attn.c_proj.bias" in keys,
        mlp_bias="transformer.h.0.mlp.c_proj.bias" in keys,
        position="rope",
        rope=rope,
        tie_word_embeddings=tied,
        logn_max_position=seq_length if config.get("use_logn_attn") else 0,
        default_max_seq_len=DEFAULT_MAX_SEQ_LEN.get(model_type, 8192),
    )


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    if "transformer.h.0.attn.c_attn.weight" not in keys:
        sample = sorted(keys)[:4]
        raise CheckpointError(
            f"MODEL_TYPE={model_type!r} expects a Qwen v1 checkpoint (transformer.h.N.attn.c_attn.weight); "
            f"this one has {sample} ..."
        )
    spec = qwen_spec(config, keys, model_type)
    drop = DROP + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())
    return FamilyModel(spec=spec, table=TABLE, drop=drop)


FAMILIES = (
    Family(
        "qwen",
        ("qwen_7b", "qwen_13b", "qwen_1b8"),
        build,
        architectures={"QWenLMHeadModel": "qwen_7b"},
        hf_model_types={"qwen": "qwen_7b"},
        layout="qwen_v1",
        tokenizer="rtp_mm.tokenizers.qwen:load",  # qwen.tiktoken (the release ships no tokenizer.json)
    ),
)
