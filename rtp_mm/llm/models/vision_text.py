"""The language models of the three vision families (llava, qwen_vl, chatglm4v), read from their real multimodal
checkpoints, and the three family declarations.

Each build reuses its text family's builder and drops the vision tensors by name: the vision encoder
(``rtp_mm.vision``, named by the family's ``vision`` entry) reads those itself from the same checkpoint, and the engine
splices its rows over the prompt's image placeholders (``llm/engine/multimodal.py``).

- ``llava``: the original LLaVA layout (``LlavaLlamaForCausalLM`` and its Mistral/Qwen siblings: the LM's names under
  ``model.``, plus ``model.mm_projector.*``, optional ``model.vision_tower.*`` and ``model.image_newline``, LM fields at
  the top of config.json) and the llava-hf layout (``LlavaForConditionalGeneration`` /
  ``LlavaNextForConditionalGeneration``: ``text_config`` / ``vision_config``; the LM under ``language_model.model.*``
  and ``language_model.lm_head`` in transformers-4 names, ``model.language_model.*`` and ``lm_head`` in
  transformers-5 names; ``multi_modal_projector.*``, ``vision_tower.*``, ``image_newline``).
- ``qwen_vl``: Qwen v1 plus ``transformer.visual.*`` (ViT + resampler).
- ``chatglm4v``: the GLM-4 LM, ChatGLM3's graph and rules (``rope_ratio`` scales the rope base), plus
  ``transformer.vision.*`` (EVA2-CLIP, conv downsample, GLU projector, boi/eoi).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models import chatglm, llama, qwen_v1
from rtp_mm.llm.models.chatglm import chatglm_names
from rtp_mm.llm.models.family import Family, FamilyModel

logger = logging.getLogger(__name__)

# Matched after the llava rename below, so one pattern covers the original and both llava-hf spellings.
LLAVA_VISION = (
    r"(model\.)?(vision_tower|vision_resampler|mm_projector|multi_modal_projector)\..+",
    r"(model\.)?image_newline",
)
QWEN_VL_VISION = (r"transformer\.visual\..+",)
GLM4V_VISION = (r"transformer\.vision\..+",)

# llava-hf LM prefixes -> the plain HF LM names the llama/qwen2 tables read.
_LLAVA_PREFIXES = (
    ("language_model.model.", "model."),  # transformers 4
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),  # transformers 5
)

# The LMs LLaVA releases embed, by text_config.model_type (llava-hf) or the original checkpoint's model_type: the Llama
# graph (Mistral's sliding window is ignored, as RTP-LLM does), or Qwen2 for LLaVA-OneVision.
_LLAMA_LMS = ("llama", "mistral", "llava", "llava_llama", "llava_mistral")
_QWEN2_LMS = ("qwen2", "llava_qwen")


def llava_rename(name: str) -> str:
    for old, new in _LLAVA_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def llava_text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The LM's config: the top level of an original LLaVA config, else llava-hf's ``text_config`` completed with its
    class defaults (llava-hf configs omit fields equal to them: llava-1.5-7b-hf gives no hidden_size)."""
    text = config.get("text_config")
    if text is None:
        return config
    if not isinstance(text, dict) or not isinstance(text.get("model_type"), str):
        raise CheckpointError("config.json text_config must be an object with a model_type (e.g. 'llama')")
    if text["model_type"] not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(
            f"config.json text_config.model_type={text['model_type']!r} is not supported for MODEL_TYPE=llava "
            "(supported: llama, mistral, qwen2)"
        )
    from transformers import AutoConfig

    fields = {k: v for k, v in text.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(text["model_type"], **fields).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json text_config is not a valid {text['model_type']} config ({e})") from e


def llava_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    text = llava_text_config(config)
    lm = text.get("model_type") if "text_config" in config else _original_lm(config)
    build = llama.build if lm in _LLAMA_LMS else llama.qwen2_build if lm in _QWEN2_LMS else None
    if build is None:
        raise CheckpointError(
            f"config.json model_type={lm!r} is not a LLaVA LM this server reads (llama, mistral, qwen2)"
        )
    renamed = {llava_rename(k) for k in keys}
    if "model.layers.0.self_attn.q_proj.weight" not in renamed:
        raise CheckpointError(
            f"MODEL_TYPE={model_type!r} expects LLaVA LM weights (model.layers.N..., "
            f"language_model.model.layers.N..., model.language_model.layers.N...); got {sorted(keys)[:4]} ..."
        )
    family = build(text, renamed, model_type)
    what = "vision_tower.*, mm_projector.* / multi_modal_projector.*, image_newline"
    return _text_only(family, model_type, renamed, LLAVA_VISION, what, rename=llava_rename)


def _original_lm(config: dict[str, Any]) -> str:
    """The LM of an original LLaVA checkpoint: its model_type, or the architecture name when that says more."""
    archs = config.get("architectures") or []
    if "LlavaQwenForCausalLM" in archs:
        return "llava_qwen"
    if "LlavaMistralForCausalLM" in archs:
        return "llava_mistral"
    return str(config.get("model_type") or "llava")


def qwen_vl_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    family = qwen_v1.build(config, keys, model_type)
    return _text_only(family, model_type, keys, QWEN_VL_VISION, "transformer.visual.*")


def chatglm4v_build(config: dict[str, Any], keys: set[str], model_type: str) -> FamilyModel:
    # GLM-4 follows ChatGLM3, not ChatGLM2: rope_ratio (absent in glm-4v-9b, so 1) multiplies the rope base.
    family = chatglm.chatglm2_build(config, keys, "chatglm3")
    return _text_only(family, model_type, keys, GLM4V_VISION, "transformer.vision.*")


def _text_only(
    family: FamilyModel,
    model_type: str,
    keys: set[str],
    vision: tuple[str, ...],
    what: str,
    rename: Callable[[str], str] | None = None,
) -> FamilyModel:
    """``family`` with the vision tensors dropped from the LM's load (and ``rename`` applied first, when given)."""
    patterns = [re.compile(p) for p in vision]
    skipped = sum(1 for k in keys if any(p.fullmatch(k) for p in patterns))
    if skipped:
        logger.debug("%s: LM skips %d vision tensors (%s); the vision encoder reads them", model_type, skipped, what)
    changes: dict[str, Any] = {"drop": family.drop + vision}
    if rename is not None:
        changes["rename"] = rename
    return dataclasses.replace(family, **changes)


def _is_qwen_vl(config: dict[str, Any]) -> bool:
    """Qwen-VL shares Qwen-7B's architecture name; its config carries the ``visual`` section."""
    return "visual" in config or "QWenMLMHeadModel" in (config.get("architectures") or [])


FAMILIES = (
    Family(
        "llava",
        ("llava",),
        llava_build,
        architectures=dict.fromkeys(
            (
                "LlavaLlamaForCausalLM",
                "LlavaForConditionalGeneration",
                "LlavaNextForConditionalGeneration",
                "LlavaMistralForCausalLM",  # LLaVA-NeXT's own repo (llava-v1.6-mistral-7b)
                "LlavaQwenForCausalLM",  # LLaVA-NeXT's own repo (llava-onevision-qwen2)
            ),
            "llava",
        ),
        hf_model_types=dict.fromkeys(("llava", "llava_next", "llava_llama", "llava_mistral", "llava_qwen"), "llava"),
        tokenizer="rtp_mm.tokenizers.llava:load",  # the original LLaVA's <image> -> -200
        vision="rtp_mm.vision.llava:load_llava",
    ),
    Family(
        "qwen_vl",
        ("qwen_vl",),
        qwen_vl_build,
        architectures={"QWenLMHeadModel": "qwen_vl", "QWenMLMHeadModel": "qwen_vl"},
        hf_model_types={"qwen": "qwen_vl"},
        detect=_is_qwen_vl,
        layout="qwen_v1",
        tokenizer="rtp_mm.tokenizers.qwen_vl:load",
        vision="rtp_mm.vision.qwen_vl:load_qwen_vl",
    ),
    Family(
        "chatglm4v",
        ("chatglm4v",),
        chatglm4v_build,
        **chatglm_names("chatglm4v"),
        detect=lambda config: "vision_config" in config,
        layout="glm_v2",
        tokenizer="rtp_mm.tokenizers.glm4:load",  # GLM-4's tokenizer.model is tiktoken, not sentencepiece
        vision="rtp_mm.vision.chatglm4v:load",
    ),
)
