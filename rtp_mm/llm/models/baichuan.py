"""Baichuan and Baichuan2: the Llama graph with a fused ``W_pack`` ``[Q | K | V]`` (no bias).

Which variant a checkpoint is comes from its config.json, as the released files differ:
- 7B (Baichuan-7B, Baichuan2-7B) use RoPE and carry ``max_position_embeddings``; 13B (Baichuan-13B, Baichuan2-13B)
  use ALiBi and carry only ``model_max_length`` (the size of their ALiBi mask). RTP-LLM keys ALiBi on 40 layers,
  which only holds for the full-size 13B, so the config key is used here.
- Baichuan2 has a NormHead: ``lm_head.weight`` is stored un-normalised and each vocab row is L2-normalised before
  use. Its configs name ``tokenizer_class`` (BaichuanTokenizer), the 7B adds ``z_loss_weight``, and the real
  vocabulary has 125696 entries (vLLM's test); Baichuan v1 configs have none of these.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models import llama_layout as llama
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.weights import Src, WeightTable

BAICHUAN2_VOCAB = 125696


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """NormHead: each vocab row scaled to unit L2 norm over the hidden dim (computed in float32)."""
    return F.normalize(weight.float(), dim=-1)


def is_alibi(config: dict[str, Any]) -> bool:
    return "max_position_embeddings" not in config


def is_baichuan2(config: dict[str, Any]) -> bool:
    return (
        config.get("vocab_size") == BAICHUAN2_VOCAB
        or config.get("tokenizer_class") == "BaichuanTokenizer"
        or "z_loss_weight" in config
    )


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    """Released checkpoints fuse q/k/v in ``W_pack``; converted ones with HF Llama names load too (RTP-LLM's
    Baichuan reads either through its Llama weight detection)."""
    w_pack = "model.layers.0.self_attn.W_pack.weight" in keys
    if not w_pack and "model.layers.0.self_attn.q_proj.weight" not in keys:
        raise CheckpointError(
            f"MODEL_TYPE={model_type!r} expects a Baichuan checkpoint (model.layers.N.self_attn.W_pack.weight, or "
            f"q_proj/k_proj/v_proj in the Llama layout); this one has {sorted(keys)[:4]} ..."
        )
    alibi = is_alibi(config)
    spec = llama.llama_spec(config, keys, position="alibi" if alibi else "rope")
    table: WeightTable = dict(llama.TABLE)
    if w_pack:
        table["layers.{i}.attn.qkv.weight"] = llama.P + "self_attn.W_pack.weight"
        del table["layers.{i}.attn.qkv.bias"]
    if is_baichuan2(config) and not spec.tie_word_embeddings:
        table["lm_head.weight"] = Src("lm_head.weight", normalize_rows)
    drop = llama.DROP + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())
    return FamilyModel(spec=spec, table=table, drop=drop)


FAMILIES = (
    Family(
        "baichuan",
        ("baichuan",),
        build,
        architectures={"BaichuanForCausalLM": "baichuan", "BaiChuanForCausalLM": "baichuan"},
        hf_model_types={"baichuan": "baichuan"},
        layout="llama",
    ),
)
