"""Model families. ``FAMILIES`` maps a family name (see rtp_mm.model_types) to its ``build`` function.

A family missing here is registered as a MODEL_TYPE but not implemented yet: loading it raises
NotImplementedYetError rather than silently running another architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtp_mm.errors import NotImplementedYetError
from rtp_mm.llm.models import (
    baichuan,
    bloom,
    chatglm,
    falcon,
    gpt_bigcode,
    gpt_neox,
    llama,
    mpt,
    phi,
    qwen_v1,
    starcoder2,
    vision_text,
)
from rtp_mm.llm.models.family import FamilyModel

BuildFn = Callable[[dict[str, Any], set[str], str], FamilyModel]

FAMILIES: dict[str, BuildFn] = {
    "llama": llama.build,
    "qwen_2": llama.qwen2_build,
    "gemma": llama.gemma_build,
    "bloom": bloom.build,
    "sgpt_bloom_vector": bloom.build,
    "gpt_bigcode": gpt_bigcode.build,
    "starcoder2": starcoder2.build,
    "gpt_neox": gpt_neox.build,
    "falcon": falcon.build,
    "mpt": mpt.build,
    "phi": phi.build,
    "chatglm": chatglm.chatglm_build,
    "glm_130b": chatglm.glm_130b_build,
    "chatglm2": chatglm.chatglm2_build,
    "chatglm3": chatglm.chatglm2_build,
    "qwen": qwen_v1.build,
    "baichuan": baichuan.build,
    "llava": vision_text.llava_build,
    "qwen_vl": vision_text.qwen_vl_build,
    "chatglm4v": vision_text.chatglm4v_build,
}


def family_builder(family: str, model_type: str) -> BuildFn:
    build = FAMILIES.get(family)
    if build is None:
        raise NotImplementedYetError(
            f"MODEL_TYPE={model_type!r} (family {family!r}) is registered but not implemented yet; "
            f"implemented families: {', '.join(sorted(FAMILIES))}"
        )
    return build
