"""rtp-mm: a multimodal-first LLM inference server.

The offline API (``LLM``, ``GenerateConfig``) is imported lazily so that ``import rtp_mm`` stays cheap for the CLI and
configuration checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rtp_mm.config import EngineConfig, ModelConfig, ServerConfig, Settings, WeightType

__version__ = "0.1.0"
__all__ = ["LLM", "GenerateConfig", "ModelConfig", "EngineConfig", "ServerConfig", "Settings", "WeightType"]

if TYPE_CHECKING:
    from rtp_mm.api import LLM
    from rtp_mm.llm.engine.generate_config import GenerateConfig


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from rtp_mm.api import LLM

        return LLM
    if name == "GenerateConfig":
        from rtp_mm.llm.engine.generate_config import GenerateConfig

        return GenerateConfig
    raise AttributeError(f"module 'rtp_mm' has no attribute {name!r}")
