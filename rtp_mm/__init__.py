"""rtp-mm: a multimodal-first LLM inference server.

Everything here is imported lazily, so ``import rtp_mm`` (and ``rtp_mm.client``, the HTTP client) stays cheap: the
offline API and the configuration pull in torch and the model families only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "EngineClient",
    "GenerateConfig",
    "ModelConfig",
    "EngineConfig",
    "ServerConfig",
    "Settings",
    "WeightType",
    "SpeculativeConfig",
    "ParallelConfig",
]

_EXPORTS = {
    "LLM": "rtp_mm.api.llm",
    "EngineClient": "rtp_mm.api.engine_client",
    "GenerateConfig": "rtp_mm.llm.engine.generate_config",
    "ModelConfig": "rtp_mm.config",
    "EngineConfig": "rtp_mm.config",
    "ServerConfig": "rtp_mm.config",
    "Settings": "rtp_mm.config",
    "WeightType": "rtp_mm.config",
    "SpeculativeConfig": "rtp_mm.speculative_config",
    "ParallelConfig": "rtp_mm.parallel_config",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from rtp_mm.api.engine_client import EngineClient
    from rtp_mm.api.llm import LLM
    from rtp_mm.config import EngineConfig, ModelConfig, ServerConfig, Settings, WeightType
    from rtp_mm.llm.engine.generate_config import GenerateConfig
    from rtp_mm.parallel_config import ParallelConfig
    from rtp_mm.speculative_config import SpeculativeConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtp_mm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
