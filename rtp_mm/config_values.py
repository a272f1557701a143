"""Value types and checks shared by the configuration dataclasses (``config.py``, ``speculative_config.py``): the
weight types of WEIGHT_TYPE / SP_WEIGHT_TYPE with RTP-LLM's aliases, and the rule that paths are local."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from rtp_mm.errors import ConfigError


class WeightType(str, Enum):
    """Weight storage / activation dtypes of RTP-LLM's WEIGHT_TYPE, with its case-insensitive aliases."""

    FP16 = "FP16"
    BF16 = "BF16"
    FP32 = "FP32"
    INT8 = "INT8"

    @classmethod
    def parse(cls, value: str | WeightType, variable: str = "WEIGHT_TYPE") -> WeightType:
        if isinstance(value, WeightType):
            return value
        key = str(value).strip().lower()
        found = _WEIGHT_TYPE_ALIASES.get(key)
        if found is None:
            accepted = "FP16 (float16), BF16 (bfloat16), FP32 (float32), INT8 (case-insensitive)"
            raise ConfigError(f"{variable}={value!r} is not a supported weight type; accepted: {accepted}")
        return found

    @property
    def is_float(self) -> bool:
        return self is not WeightType.INT8


_WEIGHT_TYPE_ALIASES = {
    "fp16": WeightType.FP16,
    "float16": WeightType.FP16,
    "half": WeightType.FP16,
    "bf16": WeightType.BF16,
    "bfloat16": WeightType.BF16,
    "bp16": WeightType.BF16,  # RTP-LLM accepts this typo
    "fp32": WeightType.FP32,
    "float32": WeightType.FP32,
    "float": WeightType.FP32,
    "int8": WeightType.INT8,
}


def is_remote(path: str) -> bool:
    return "://" in path


def check_local_path(path: str, variable: str, must_be_dir: bool = False) -> None:
    """Paths of the seed must be local; say which variable points where when they are not."""
    accepted = "an existing local directory" if must_be_dir else "an existing local file or directory"
    if not isinstance(path, str):
        raise ConfigError(f"{variable}={path!r} is not a path string; accepted: {accepted}")
    if is_remote(path):
        raise ConfigError(
            f"{variable}={path!r} must be a local path (remote URIs are not fetched by rtp-mm); accepted: {accepted}"
        )
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{variable}={path!r} does not exist; accepted: {accepted}")
    if must_be_dir and not p.is_dir():
        raise ConfigError(f"{variable}={path!r} is not a directory; accepted: {accepted}")
