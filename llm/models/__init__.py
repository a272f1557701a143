"""Model families. ``FAMILIES`` maps a family name (see rtp_mm.model_types) to its ``build`` function.

A family missing here is registered as a MODEL_TYPE but not implemented yet: loading it raises
NotImplementedYetError rather than silently running another architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtp_mm.errors import NotImplementedYetError
from rtp_mm.llm.models import baichuan, llama, qwen_v1
from rtp_mm.llm.models.family import FamilyModel

BuildFn = Callable[[dict[str, Any], set[str], str], FamilyModel]

FAMILIES: dict[str, BuildFn] = {
    "llama": llama.build,
    "qwen_2": llama.qwen2_build,
    "gemma": llama.gemma_build,
    "qwen": qwen_v1.build,
    "baichuan": baichuan.build,
}


def family_builder(family: str, model_type: str) -> BuildFn:
    build = FAMILIES.get(family)
    if build is None:
        raise NotImplementedYetError(
            f"MODEL_TYPE={model_type!r} (family {family!r}) is registered but not implemented yet; "
            f"implemented families: {', '.join(sorted(FAMILIES))}"
        )
    return build
