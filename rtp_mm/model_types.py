"""The MODEL_TYPE registry: every name of the seed's Config.md, the family that serves it, and detection.

One explicit table (vLLM's habit): a MODEL_TYPE name maps to a *family* (one implementation file under
``rtp_mm.llm.models``); aliases share a family. ``detect_model_type`` reads a checkpoint's ``config.json`` so that a
MODEL_TYPE that contradicts the checkpoint fails with a friendly message instead of a shape error deep in loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError


@dataclass(frozen=True)
class ModelTypeInfo:
    """One MODEL_TYPE name of the seed."""

    name: str  # the MODEL_TYPE value users set
    family: str  # implementation family (a module name in rtp_mm.llm.models)
    vision: bool = False  # carries a vision encoder (llava, qwen_vl, chatglm4v)
    embedding: bool = False  # an embedding model: no generation, pooled vectors out


def _entries(family: str, *names: str, **flags: bool) -> dict[str, ModelTypeInfo]:
    return {n: ModelTypeInfo(name=n, family=family, **flags) for n in names}


# All 30 names of ../shared/seed/Config.md, in the seed's order within each family.
MODEL_TYPES: dict[str, ModelTypeInfo] = {
    **_entries("chatglm", "chatglm", "chat_glm"),
    **_entries("chatglm2", "chatglm2", "chat_glm_2"),
    **_entries("chatglm3", "chatglm3", "chat_glm_3"),
    **_entries("glm_130b", "glm_130b"),
    **_entries("gpt_bigcode", "gpt_bigcode", "wizardcoder"),
    **_entries("starcoder2", "starcoder2"),
    **_entries("bloom", "bloom", "sgpt_bloom"),
    **_entries("sgpt_bloom_vector", "sgpt_bloom_vector", embedding=True),
    **_entries("llama", "llama", "xverse", "aquila", "internlm"),
    **_entries("gemma", "gemma"),
    **_entries("llava", "llava", vision=True),
    **_entries("baichuan", "baichuan"),
    **_entries("gpt_neox", "gpt_neox"),
    **_entries("qwen", "qwen_7b", "qwen_13b", "qwen_1b8"),
    **_entries("qwen_2", "qwen_2"),
    **_entries("qwen_vl", "qwen_vl", vision=True),
    **_entries("falcon", "falcon"),
    **_entries("mpt", "mpt"),
    **_entries("phi", "phi"),
    **_entries("chatglm4v", "chatglm4v", vision=True),
}

SUPPORTED_NAMES: tuple[str, ...] = tuple(sorted(MODEL_TYPES))

# HF `architectures` entry -> the canonical MODEL_TYPE it implies.
ARCHITECTURE_TO_MODEL_TYPE: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "YiForCausalLM": "llama",
    "XverseForCausalLM": "xverse",
    "AquilaModel": "aquila",
    "AquilaForCausalLM": "aquila",
    "InternLMForCausalLM": "internlm",
    "GemmaForCausalLM": "gemma",
    "Qwen2ForCausalLM": "qwen_2",
    "QWenLMHeadModel": "qwen_7b",
    "QWenMLMHeadModel": "qwen_vl",
    "BaichuanForCausalLM": "baichuan",
    "BaiChuanForCausalLM": "baichuan",
    "BloomForCausalLM": "bloom",
    "BloomModel": "bloom",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
    "MPTForCausalLM": "mpt",
    "MptForCausalLM": "mpt",
    "PhiForCausalLM": "phi",
    "MixFormerSequentialForCausalLM": "phi",
    "LlavaLlamaForCausalLM": "llava",
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava",
    "LlavaMistralForCausalLM": "llava",  # LLaVA-NeXT's own repo (llava-v1.6-mistral-7b)
    "LlavaQwenForCausalLM": "llava",  # LLaVA-NeXT's own repo (llava-onevision-qwen2)
}

# HF `model_type` field -> canonical MODEL_TYPE, used when `architectures` is missing or unknown.
HF_MODEL_TYPE_TO_MODEL_TYPE: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "gemma": "gemma",
    "qwen2": "qwen_2",
    "qwen": "qwen_7b",
    "baichuan": "baichuan",
    "bloom": "bloom",
    "gpt_bigcode": "gpt_bigcode",
    "starcoder2": "starcoder2",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
    "mpt": "mpt",
    "phi": "phi",
    "phi-msft": "phi",
    "mixformer-sequential": "phi",
    "internlm": "internlm",
    "xverse": "xverse",
    "aquila": "aquila",
    "llava": "llava",
    "llava_next": "llava",
    "llava_llama": "llava",
    "llava_mistral": "llava",
    "llava_qwen": "llava",
}

# Families that read the same checkpoint layout, so a MODEL_TYPE from one may serve a checkpoint detected as
# another (RTP-LLM serves internlm/xverse/aquila through its Llama class, and Baichuan-7B is a Llama with W_pack).
_COMPATIBLE_FAMILIES: tuple[frozenset[str], ...] = (
    frozenset({"llama", "baichuan"}),
    frozenset({"bloom", "sgpt_bloom_vector"}),
    frozenset({"qwen", "qwen_vl"}),
    # GLM v1 (2D RoPE, prefix-LM mask, per-head interleaved qkv) and GLM-130B, which inherits its layout and mask.
    frozenset({"chatglm", "glm_130b"}),
    # ChatGLM2/3 and GLM-4(V) share the causal MQA layout; v1 and v2 weights and positions are not interchangeable.
    frozenset({"chatglm2", "chatglm3", "chatglm4v"}),
)


def resolve_model_type(name: str, variable: str = "MODEL_TYPE") -> ModelTypeInfo:
    """The registry entry for ``name``; an unknown name raises ConfigError listing every supported name."""
    info = MODEL_TYPES.get(name)
    if info is None:
        raise ConfigError(f"{variable}={name!r} is not a supported model type; supported: {', '.join(SUPPORTED_NAMES)}")
    return info


def detect_model_type(config: dict[str, Any]) -> str | None:
    """The canonical MODEL_TYPE a checkpoint's config.json implies, or None when it cannot tell."""
    for arch in config.get("architectures") or []:
        if arch == "ChatGLMModel" or arch == "ChatGLMForConditionalGeneration":
            return _detect_chatglm(config)
        if arch in ARCHITECTURE_TO_MODEL_TYPE:
            name = ARCHITECTURE_TO_MODEL_TYPE[arch]
            if name == "qwen_7b" and "visual" in config:
                return "qwen_vl"
            return name
    hf_type = config.get("model_type")
    if hf_type in ("chatglm", "glm"):
        return _detect_chatglm(config)
    if hf_type == "qwen" and "visual" in config:
        return "qwen_vl"
    return HF_MODEL_TYPE_TO_MODEL_TYPE.get(hf_type) if isinstance(hf_type, str) else None


def _detect_chatglm(config: dict[str, Any]) -> str:
    if "vision_config" in config:
        return "chatglm4v"
    if "multi_query_group_num" in config or "padded_vocab_size" in config:
        # ChatGLM2 and ChatGLM3 share one config shape; chatglm3 differs only in the rope base, read from the
        # config, so either MODEL_TYPE is compatible (see _COMPATIBLE_FAMILIES).
        return "chatglm2"
    return "chatglm"


def read_config_json(ckpt_path: str | Path) -> dict[str, Any] | None:
    """``config.json`` of a checkpoint folder, or None if the folder has none (e.g. a GGUF file)."""
    path = Path(ckpt_path)
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"CHECKPOINT_PATH={str(path)!r}: config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ConfigError(f"CHECKPOINT_PATH={str(path)!r}: config.json must hold a JSON object, not a JSON {kind}")
    return config


def families_compatible(requested: str, detected: str) -> bool:
    if requested == detected:
        return True
    return any(requested in group and detected in group for group in _COMPATIBLE_FAMILIES)


def check_model_type_matches(model_type: str, config: dict[str, Any], ckpt_path: str) -> None:
    """Raise a friendly ConfigError when MODEL_TYPE contradicts what the checkpoint's config.json says."""
    detected = detect_model_type(config)
    if detected is None:
        return
    requested_family = resolve_model_type(model_type).family
    detected_family = MODEL_TYPES[detected].family
    if not families_compatible(requested_family, detected_family):
        archs = config.get("architectures") or config.get("model_type")
        raise ConfigError(
            f"MODEL_TYPE={model_type!r} does not match the checkpoint at CHECKPOINT_PATH={ckpt_path!r}: "
            f"its config.json ({archs}) is a {detected!r} checkpoint; "
            f"set MODEL_TYPE={detected} (or another name of that family)"
        )
