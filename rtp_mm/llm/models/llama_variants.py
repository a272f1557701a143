"""Llama renamings (InternLM v1, XVERSE, Aquila / Aquila2): the HF Llama layout under their own architecture names,
served by the Llama family. Their q/k/v/o biases (InternLM), GQA and ``rope_theta`` (Aquila2) are read by
``llama_spec`` from the keys and config; what it cannot read is handled here.

InternLM's December-2023 code reads the rotary settings from ``rotary = {"base", "type": "origin" | "dynamic",
"scaling_factor"}`` instead of ``rope_theta`` / ``rope_scaling``. Its dynamic type is the HF dynamic-NTK formula, but
that code caches un-rotated keys and re-rotates all of them with the current base every step, while the paged cache
keeps keys rotated with the base of the step that wrote them: identical up to ``max_position_embeddings``, slightly
different beyond it.
"""

from __future__ import annotations

from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.hf_config import get
from rtp_mm.llm.models.rope import RopeSpec


def internlm_rope(config: dict[str, Any]) -> RopeSpec | None:
    """RopeSpec from InternLM's ``rotary`` dict, or None when the config has none."""
    rotary = config.get("rotary")
    if not isinstance(rotary, dict):
        return None
    theta = float(rotary.get("base", 10000.0))
    kind = rotary.get("type", "origin")
    if kind == "origin":
        return RopeSpec(theta=theta)
    if kind == "dynamic":
        return RopeSpec(
            theta=theta,
            scaling="dynamic",
            factor=float(rotary.get("scaling_factor", 1.0)),
            original_max_position=int(get(config, "max_position_embeddings", default=2048)),
        )
    raise CheckpointError(f"config.json rotary.type={kind!r} is not supported (InternLM accepts origin, dynamic)")


def overrides(config: dict[str, Any]) -> dict[str, Any]:
    """DecoderSpec fields a Llama renaming sets differently from what ``llama_spec`` reads."""
    rope = internlm_rope(config)
    return {"rope": rope} if rope is not None else {}
