"""MODEL_TYPE names: lookup, detection from a checkpoint's config.json, and compatibility checks.

Every answer comes from the one family registry (``rtp_mm.llm.models.FAMILIES``); nothing here lists a family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtp_mm.errors import ConfigError
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.family import Family


@dataclass(frozen=True)
class ModelTypeInfo:
    """One MODEL_TYPE name of the seed, as its family declares it."""

    name: str  # the MODEL_TYPE value users set
    family: str  # implementation family (its declaration: ``family_of(name)``)
    vision: bool = False  # carries a vision encoder (llava, qwen_vl, chatglm4v)
    embedding: bool = False  # an embedding model: no generation, pooled vectors out


def model_types() -> dict[str, ModelTypeInfo]:
    """Every MODEL_TYPE name of the registry (read afresh: the registry is the only copy)."""
    return {
        name: ModelTypeInfo(name, family.name, vision=bool(family.vision), embedding=family.embedding)
        for family in FAMILIES.values()
        for name in family.model_types
    }


def resolve_model_type(name: str, variable: str = "MODEL_TYPE") -> ModelTypeInfo:
    """The registry entry for ``name``; an unknown name raises ConfigError listing every supported name."""
    infos = model_types()
    info = infos.get(name)
    if info is None:
        raise ConfigError(f"{variable}={name!r} is not a supported model type; supported: {', '.join(sorted(infos))}")
    return info


def family_of(model_type: str) -> Family:
    return FAMILIES[resolve_model_type(model_type).family]


def detect_model_type(config: dict[str, Any]) -> str | None:
    """The MODEL_TYPE a checkpoint's config.json implies, or None when it cannot tell: its ``architectures`` first,
    then its ``model_type``."""
    for arch in config.get("architectures") or []:
        family = _pick([f for f in FAMILIES.values() if arch in f.architectures], config)
        if family is not None:
            return family.architectures[arch]
    hf_type = config.get("model_type")
    if isinstance(hf_type, str):
        family = _pick([f for f in FAMILIES.values() if hf_type in f.hf_model_types], config)
        if family is not None:
            return family.hf_model_types[hf_type]
    return None


def _pick(candidates: list[Family], config: dict[str, Any]) -> Family | None:
    """Among families listing the same name: the one whose ``detect`` accepts the config, else the plain one."""
    for family in candidates:
        if family.detect is not None and family.detect(config):
            return family
    return next((f for f in candidates if f.detect is None), None)


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
    """Whether family ``requested`` reads checkpoints of family ``detected`` (the same family or the same layout)."""
    if requested == detected:
        return True
    layout = FAMILIES[requested].layout
    return bool(layout) and FAMILIES[detected].layout == layout


def check_model_type_matches(model_type: str, config: dict[str, Any], ckpt_path: str) -> None:
    """Raise a friendly ConfigError when MODEL_TYPE contradicts what the checkpoint's config.json says."""
    detected = detect_model_type(config)
    if detected is None:
        return
    requested_family = resolve_model_type(model_type).family
    detected_family = resolve_model_type(detected).family
    if not families_compatible(requested_family, detected_family):
        archs = config.get("architectures") or config.get("model_type")
        raise ConfigError(
            f"MODEL_TYPE={model_type!r} does not match the checkpoint at CHECKPOINT_PATH={ckpt_path!r}: "
            f"its config.json ({archs}) is a {detected!r} checkpoint; "
            f"set MODEL_TYPE={detected} (or another name of that family)"
        )
