"""GLM families over the one decoder.

- ``chatglm`` (ChatGLM-6B v1, THUDM/chatglm-6b layout ``transformer.layers.N.attention.query_key_value``): LayerNorm,
  DeepNorm-style residual ``alpha * norm(x) + sublayer(norm(x))`` with alpha = sqrt(2 * num_layers), 2D rotary with
  fp16-rounded frequencies, per-head interleaved fused qkv with bias, tanh-GELU MLP, prefix-LM attention up to
  ``<sop>`` (see prefix_lm.py), output tied to the word embeddings unless the config unties it.
- ``glm_130b``: the same skeleton and checkpoint names (a merged single-partition checkpoint: SAT's model-parallel
  shards are not read), GeGLU MLP ``x1 * gelu(x2)``, 1D rotary over the whole head, tied output. GLM-130B ships no
  config.json; missing fields take the released model's values, as RTP-LLM hard-codes them.
- ``chatglm2`` / ``chatglm3`` (THUDM/chatglm2-6b and chatglm3-6b layout ``transformer.encoder.layers.N...``): RMSNorm,
  GQA with ``multi_query_group_num`` groups, fused ``[Q | K | V]`` with bias, rotary on the first half of each head
  with interleaved pairs, SwiGLU ``dense_h_to_4h = [gate; up]``. ``rope_ratio`` interpolates positions in ChatGLM2
  (chatglm2-6b-32k) but scales the base in ChatGLM3 (chatglm3-6b-32k/128k), as each original does.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import get
from rtp_mm.llm.models.prefix_lm import PrefixLM
from rtp_mm.llm.models.rope import RopeSpec
from rtp_mm.llm.models.weights import Src, WeightTable

# ---- ChatGLM-6B v1 and GLM-130B ---------------------------------------------------------------------------------

V1 = "transformer.layers.{i}."

# GLM-130B's released shape (configs/model_glm_130b.sh), used where its config.json is silent.
GLM_130B_DEFAULTS: dict[str, Any] = dict(
    vocab_size=150528,
    hidden_size=12288,
    num_layers=70,
    num_attention_heads=96,
    inner_hidden_size=32768,
    layernorm_epsilon=1e-5,
    max_sequence_length=2048,
    mask_token_id=150000,
    gmask_token_id=150001,
    smask_token_id=150002,
    bos_token_id=150004,
    eos_token_id=20002,
)


CHATGLM_6B_ALPHA_LAYERS = 28
# A P-tuning v2 prefix encoder saved with the model becomes KV blocks (ptuning.py), never decoder weights.
PREFIX_ENCODER = r"transformer\.prefix_encoder\..*"


def deinterleave_qkv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows stored per head as ``[q_h, k_h, v_h]`` (GLM v1, Megatron) -> ``[Q | K | V]``; weight or bias."""
    return t.unflatten(0, (num_heads, 3, -1)).transpose(0, 1).flatten(0, 2)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """GeGLU computes ``x1 * gelu(x2)``: the activated half is the second one, the decoder's gate is the first."""
    x1, x2 = t.chunk(2, dim=0)
    return torch.cat((x2, x1), dim=0)


def _check_unsupported(config: dict[str, Any]) -> None:
    """Quantized ChatGLM releases carry extra tensors and change the maths: refuse them by name. (A P-tuned one's
    ``pre_seq_len`` and prefix encoder are read by ptuning.py, not by the decoder.)"""
    if config.get("quantization_bit"):
        raise CheckpointError(
            f"config.json quantization_bit={config['quantization_bit']}: quantized ChatGLM checkpoints are not "
            "supported; load the fp16 release (WEIGHT_TYPE=INT8 quantizes at load time)"
        )


def _v1_table(num_heads: int, geglu: bool) -> WeightTable:
    qkv = partial(deinterleave_qkv, num_heads=num_heads)
    mlp_in = "layers.{i}.mlp.gate_up." if geglu else "layers.{i}.mlp.up."
    table: WeightTable = {
        "embed.weight": "transformer.word_embeddings.weight",
        "norm.weight": "transformer.final_layernorm.weight",
        "norm.bias": "transformer.final_layernorm.bias",
        "lm_head.weight": "lm_head.weight",
    }
    for ours, theirs in (("input_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm")):
        for p in ("weight", "bias"):
            table[f"layers.{{i}}.{ours}.{p}"] = V1 + f"{theirs}.{p}"
    for p in ("weight", "bias"):
        table[f"layers.{{i}}.attn.qkv.{p}"] = Src(V1 + f"attention.query_key_value.{p}", qkv)
        table[f"layers.{{i}}.attn.o.{p}"] = V1 + f"attention.dense.{p}"
        table[mlp_in + p] = Src(V1 + f"mlp.dense_h_to_4h.{p}", swap_halves if geglu else None)
        table[f"layers.{{i}}.mlp.down.{p}"] = V1 + f"mlp.dense_4h_to_h.{p}"
    return table


def _glm_v1_build(config: dict[str, Any], keys: set[str], glm_130b: bool) -> FamilyModel:
    if glm_130b:
        config = {**GLM_130B_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    _check_unsupported(config)
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", required=True))
    layers = int(get(config, "num_layers", required=True))
    head_dim = hidden // heads
    sop = int(get(config, "bos_token_id", default=130004))
    # Both ChatGLM-6B vocabularies (150528 and 130528) place [MASK], [gMASK] 4 and 3 ids below <sop>.
    mask = int(get(config, "mask_token_id", default=sop - 4))
    gmask = int(get(config, "gmask_token_id", default=sop - 3))
    two_d = not glm_130b and bool(config.get("position_encoding_2d", True))
    if glm_130b:
        mask_ids = (mask, int(config["smask_token_id"]), gmask)
        tied = True
    else:
        mask_ids = (gmask, mask)
        # The original config leaves tie_word_embeddings at transformers' default (true).
        tied = bool(config.get("tie_word_embeddings", True)) or "lm_head.weight" not in keys
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=int(get(config, "inner_hidden_size", default=4 * hidden)),
        norm="layer",
        norm_bias=True,
        norm_eps=float(get(config, "layernorm_epsilon", default=1e-5)),
        activation="gelu" if glm_130b else "gelu_tanh",
        gated_mlp=glm_130b,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position="rope",
        rope=RopeSpec(theta=10000.0, two_d=two_d, fp16_inv_freq=True),
        tie_word_embeddings=tied,
        default_max_seq_len=int(get(config, "max_sequence_length", default=2048)),
        # ChatGLM-6B's model builds every GLMBlock without passing num_layers, so alpha keeps that class's default
        # of 28 layers whatever the config says (the same value for the released 28-layer model).
        norm_residual_alpha=math.sqrt(2 * (layers if glm_130b else CHATGLM_6B_ALPHA_LAYERS)),
        prefix_lm=PrefixLM(sop_id=sop, mask_ids=mask_ids, gmask_id=gmask, two_d=two_d),
    )
    # The per-layer rotary inv_freq buffers are saved but never loaded by the original (it rebuilds them in fp16).
    drop = (r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq", PREFIX_ENCODER)
    if tied:
        drop += (r"lm_head\.weight",)
    return FamilyModel(spec=spec, table=_v1_table(heads, geglu=glm_130b), drop=drop)


def chatglm_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    return _glm_v1_build(config, keys, glm_130b=False)


def glm_130b_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    return _glm_v1_build(config, keys, glm_130b=True)


# ---- ChatGLM2 / ChatGLM3 ----------------------------------------------------------------------------------------

V2 = "transformer.encoder.layers.{i}."

V2_TABLE: WeightTable = {
    "embed.weight": "transformer.embedding.word_embeddings.weight",
    "layers.{i}.input_norm.weight": V2 + "input_layernorm.weight",
    "layers.{i}.input_norm.bias": V2 + "input_layernorm.bias",
    "layers.{i}.attn.qkv.weight": V2 + "self_attention.query_key_value.weight",
    "layers.{i}.attn.qkv.bias": V2 + "self_attention.query_key_value.bias",
    "layers.{i}.attn.o.weight": V2 + "self_attention.dense.weight",
    "layers.{i}.attn.o.bias": V2 + "self_attention.dense.bias",
    "layers.{i}.post_norm.weight": V2 + "post_attention_layernorm.weight",
    "layers.{i}.post_norm.bias": V2 + "post_attention_layernorm.bias",
    "layers.{i}.mlp.gate_up.weight": V2 + "mlp.dense_h_to_4h.weight",  # [gate; up], as the decoder fuses them
    "layers.{i}.mlp.gate_up.bias": V2 + "mlp.dense_h_to_4h.bias",
    "layers.{i}.mlp.down.weight": V2 + "mlp.dense_4h_to_h.weight",
    "layers.{i}.mlp.down.bias": V2 + "mlp.dense_4h_to_h.bias",
    "norm.weight": "transformer.encoder.final_layernorm.weight",
    "norm.bias": "transformer.encoder.final_layernorm.bias",
    "lm_head.weight": "transformer.output_layer.weight",
}


def chatglm2_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    _check_unsupported(config)
    if config.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError("config.json apply_residual_connection_post_layernorm=true is not supported")
    if not config.get("post_layer_norm", True):
        raise CheckpointError("config.json post_layer_norm=false (no final norm) is not supported")
    hidden = int(get(config, "hidden_size", required=True))
    heads = int(get(config, "num_attention_heads", required=True))
    head_dim = int(get(config, "kv_channels", default=hidden // heads))
    kv_heads = int(get(config, "multi_query_group_num", default=1)) if config.get("multi_query_attention") else heads
    bias = bool(config.get("add_bias_linear", False))
    ratio = float(get(config, "rope_ratio", default=1.0))
    half = dict(theta=10000.0, dim=head_dim // 2, interleaved=True)
    if model_type in ("chatglm3", "chat_glm_3"):
        rope = RopeSpec(**{**half, "theta": 10000.0 * ratio})
    elif ratio != 1.0:
        rope = RopeSpec(**half, scaling="linear", factor=ratio)
    else:
        rope = RopeSpec(**half)
    rms = bool(config.get("rmsnorm", True))
    tied = bool(config.get("tie_word_embeddings", False)) or "transformer.output_layer.weight" not in keys
    spec = DecoderSpec(
        vocab_size=int(get(config, "padded_vocab_size", "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=int(get(config, "num_layers", required=True)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(get(config, "ffn_hidden_size", required=True)),
        norm="rms" if rms else "layer",
        norm_bias=not rms,
        norm_eps=float(get(config, "layernorm_epsilon", default=1e-5)),
        activation="silu",
        qkv_bias=bias or bool(config.get("add_qkv_bias", False)),
        o_bias=bias,
        mlp_bias=bias,
        position="rope",
        rope=rope,
        tie_word_embeddings=tied,
        default_max_seq_len=int(get(config, "seq_length", default=8192)),
    )
    drop = (r"transformer\.rotary_pos_emb\.inv_freq", PREFIX_ENCODER)
    if tied:
        drop += (r"transformer\.output_layer\.weight",)
    return FamilyModel(spec=spec, table=V2_TABLE, drop=drop)


# ChatGLM-6B, ChatGLM2/3 and GLM-4(V) all call themselves ChatGLMModel / ChatGLMForConditionalGeneration (config
# model_type chatglm); the config's fields tell them apart. ChatGLM3 differs from ChatGLM2 only in its rope rule, read
# from the config, so detection names chatglm2 and MODEL_TYPE=chatglm3 serves the same checkpoints (same layout).
_CHATGLM_ARCHS = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
_CHATGLM_TYPES = ("chatglm", "glm")


def chatglm_names(model_type: str) -> dict[str, dict[str, str]]:
    """The ChatGLM detection names, all implying ``model_type``."""
    return {
        "architectures": dict.fromkeys(_CHATGLM_ARCHS, model_type),
        "hf_model_types": dict.fromkeys(_CHATGLM_TYPES, model_type),
    }


def is_chatglm2_config(config: dict[str, Any]) -> bool:
    """ChatGLM2/3 (and text-only GLM-4): GQA and a padded vocabulary; GLM-4V adds a vision_config."""
    return "vision_config" not in config and ("multi_query_group_num" in config or "padded_vocab_size" in config)


FAMILIES = (
    Family(
        "chatglm",
        ("chatglm", "chat_glm"),
        chatglm_build,
        **chatglm_names("chatglm"),
        layout="glm_v1",
        tokenizer="rtp_mm.tokenizers.glm:load_chatglm",
        ptuning=True,
    ),
    # GLM-130B ships no config.json (nothing to detect) and reads ChatGLM-6B's layout; its icetk tokenizer has no
    # adapter, so it takes a tokenizer.json or runs on token ids.
    Family("glm_130b", ("glm_130b",), glm_130b_build, layout="glm_v1"),
    Family(
        "chatglm2",
        ("chatglm2", "chat_glm_2"),
        chatglm2_build,
        **chatglm_names("chatglm2"),
        detect=is_chatglm2_config,
        layout="glm_v2",
        tokenizer="rtp_mm.tokenizers.glm:load_chatglm2",
        ptuning=True,
    ),
    Family(
        "chatglm3",
        ("chatglm3", "chat_glm_3"),
        chatglm2_build,
        layout="glm_v2",
        tokenizer="rtp_mm.tokenizers.glm:load_chatglm3",
        ptuning=True,
    ),
)
