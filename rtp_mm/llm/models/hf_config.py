"""Reading the common fields of HF-style config.json files (old and new rope formats, key aliases)."""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.rope import RopeSpec


def get(config: dict[str, Any], *keys: str, default: Any = None, required: bool = False) -> Any:
    """The first present key of ``keys``; a missing required key names every alias tried."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if required:
        raise CheckpointError(f"config.json lacks {' / '.join(keys)}")
    return default


def rope_spec(config: dict[str, Any], head_dim: int, rotary_dim: int | None = None) -> RopeSpec:
    """RopeSpec from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(get(config, "rope_theta", default=None) or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    max_pos = int(get(config, "max_position_embeddings", default=2048))
    partial = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    dim = rotary_dim if rotary_dim is not None else int(head_dim * partial)
    base = dict(theta=theta, dim=dim if dim != head_dim else 0)
    if kind in ("default", None):
        return RopeSpec(**base)
    factor = float(params.get("factor") or 1.0)
    if kind == "linear":
        return RopeSpec(**base, scaling="linear", factor=factor)
    if kind == "dynamic":
        return RopeSpec(**base, scaling="dynamic", factor=factor, original_max_position=max_pos)
    original = int(params.get("original_max_position_embeddings") or max_pos)
    if kind == "llama3":
        return RopeSpec(
            **base,
            scaling="llama3",
            factor=factor,
            original_max_position=original,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    if kind == "yarn":
        return RopeSpec(
            **base,
            scaling="yarn",
            factor=factor,
            original_max_position=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
    raise CheckpointError(f"config.json rope scaling type {kind!r} is not supported (linear, dynamic, yarn, llama3)")


def activation(name: str | None, default: str = "silu") -> str:
    """HF activation names -> DecoderSpec.activation."""
    name = name or default
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_tanh": "gelu_tanh",
        "relu": "relu",
    }
    if name not in table:
        raise CheckpointError(f"config.json activation {name!r} is not supported ({sorted(table)})")
    return table[name]
