"""Phi (``phi``: phi-1, phi-1.5, phi-2) in three checkpoint layouts:
  * transformers ``PhiForCausalLM``: ``model.layers.{i}.self_attn.{q,k,v}_proj`` / ``dense``, ``mlp.fc1/fc2``;
  * the original phi-1.5 ``MixFormerSequentialForCausalLM`` export that RTP-LLM reads: ``layers.0.wte``, block i at
    ``layers.{i+1}`` (``ln``, ``mixer.Wqkv`` as ``[Q | K | V]``, ``mixer.out_proj``, ``mlp``), the head at
    ``layers.{L+1}`` (``ln`` + ``linear``);
  * the later ``phi-msft`` export: ``transformer.embd.wte``, ``transformer.h.{i}``, ``lm_head.ln`` / ``lm_head.linear``.
The older two are renamed to the transformers names; the graph is the same: one LayerNorm feeding attention and the
MLP in parallel, NeoX rope over the first ``rotary_dim`` dims of each head, tanh GELU, an LM head with bias.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import Family, FamilyModel
from rtp_mm.llm.models.hf_config import activation, get, rope_spec
from rtp_mm.llm.models.weights import Cat, WeightTable, weight_and_bias

P = "model.layers.{i}."

TABLE: WeightTable = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn.qkv.weight": Cat(*(P + f"self_attn.{x}_proj.weight" for x in "qkv")),
    "layers.{i}.attn.qkv.bias": Cat(*(P + f"self_attn.{x}_proj.bias" for x in "qkv")),
    **weight_and_bias(
        {
            "layers.{i}.input_norm": P + "input_layernorm",
            "layers.{i}.attn.o": P + "self_attn.dense",
            "layers.{i}.mlp.up": P + "mlp.fc1",
            "layers.{i}.mlp.down": P + "mlp.fc2",
            "norm": "model.final_layernorm",
            "lm_head": "lm_head",
        }
    ),
}

# The older exports fuse q/k/v in one ``Wqkv`` (renamed below to sit next to the transformers names).
LEGACY_TABLE: WeightTable = {
    **TABLE,
    "layers.{i}.attn.qkv.weight": P + "self_attn.Wqkv.weight",
    "layers.{i}.attn.qkv.bias": P + "self_attn.Wqkv.bias",
}

DROP = (r"model\.layers\.\d+\.self_attn\.(rotary_emb\.inv_freq|inv_freq)",)

_BLOCK_PARTS = {"ln": "input_layernorm", "mixer.Wqkv": "self_attn.Wqkv", "mixer.out_proj": "self_attn.dense"}


def _legacy_renamer(num_layers: int) -> Callable[[str], str]:
    """Maps mixformer (``layers.N``) and phi-msft names onto the transformers names; others pass unchanged."""

    def block(i: int, rest: str) -> str:
        for old, new in _BLOCK_PARTS.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        rest = rest.replace("mixer.rotary_emb.", "self_attn.rotary_emb.")
        return f"model.layers.{i}.{rest}"

    def head(rest: str) -> str:
        if rest.startswith("ln."):
            return "model.final_layernorm." + rest[3:]
        return "lm_head." + rest.removeprefix("linear.")

    def rename(name: str) -> str:
        if name in ("layers.0.wte.weight", "transformer.embd.wte.weight"):
            return "model.embed_tokens.weight"
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m:
            n = int(m.group(1))
            return head(m.group(2)) if n == num_layers + 1 else block(n - 1, m.group(2))
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        if m:
            return block(int(m.group(1)), m.group(2))
        if name.startswith("lm_head.ln.") or name.startswith("lm_head.linear."):
            return head(name.removeprefix("lm_head."))
        return name

    return rename


def build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    if config.get("qk_layernorm"):
        raise CheckpointError("config.json qk_layernorm=true is not supported for phi")
    hidden = int(get(config, "hidden_size", "n_embd", required=True))
    heads = int(get(config, "num_attention_heads", "n_head", required=True))
    head_dim = hidden // heads
    num_layers = int(get(config, "num_hidden_layers", "n_layer", required=True))
    rotary_dim = config.get("rotary_dim")  # the older exports; transformers uses partial_rotary_factor
    spec = DecoderSpec(
        vocab_size=int(get(config, "vocab_size", required=True)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(get(config, "num_key_value_heads", "n_head_kv", default=heads)),
        head_dim=head_dim,
        intermediate_size=int(get(config, "intermediate_size", "n_inner", default=4 * hidden)),
        norm="layer",
        norm_eps=float(get(config, "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        norm_bias=True,
        activation=activation(get(config, "hidden_act", "activation_function"), default="gelu_new"),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position="rope",
        rope=rope_spec(config, head_dim, rotary_dim=int(rotary_dim) if rotary_dim else None),
        parallel_residual=True,
        shared_input_norm=True,
        lm_head_bias=True,
        default_max_seq_len=int(get(config, "max_position_embeddings", "n_positions", default=2048)),
    )
    legacy = "layers.0.wte.weight" in keys or "transformer.embd.wte.weight" in keys
    if legacy:
        return FamilyModel(spec=spec, table=LEGACY_TABLE, drop=DROP, rename=_legacy_renamer(num_layers))
    return FamilyModel(spec=spec, table=TABLE, drop=DROP)


FAMILIES = (
    Family(
        "phi",
        ("phi",),
        build,
        architectures={"PhiForCausalLM": "phi", "MixFormerSequentialForCausalLM": "phi"},
        hf_model_types={"phi": "phi", "phi-msft": "phi", "mixformer-sequential": "phi"},
    ),
)
