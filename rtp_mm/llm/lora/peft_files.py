"""PEFT LoRA adapter folders: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``adapter_model.bin``).

The tensors are ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r], where
``<module>`` is the Hugging Face module name (``model.layers.0.self_attn.q_proj``). The update of a module is
``scale * B @ A`` with scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), the module's alpha
taken from ``alpha_pattern`` and its rank from the tensors (``rank_pattern`` may vary it per module), as PEFT does.

PEFT options that change the maths beyond that (DoRA, trained biases, ``modules_to_save``, trainable tokens, ...) are
refused by name rather than silently dropped: the adapter would otherwise answer differently than it was trained.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# "<module>.lora_A.weight", optionally with the adapter's name before ".weight" (older PEFT saves).
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight")
# adapter_config.json fields that must be unset (falsy): each changes the maths beyond ``x @ A^T @ B^T * scale``.
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
)


@dataclass(frozen=True)
class LoraPair:
    """One module's low-rank update: ``delta W = scale * b @ a``."""

    a: torch.Tensor  # [rank, in] float32
    b: torch.Tensor  # [out, rank] float32
    scale: float


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter as read from its folder: HF module name -> its update."""

    path: str
    rank: int  # adapter_config.json's r (per-module ranks come from the tensors)
    alpha: float
    modules: dict[str, LoraPair]


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and check a PEFT LoRA folder; CheckpointError names the file, key or option that is wrong."""
    folder = Path(path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"LoRA adapter {str(folder)!r} has no {CONFIG_FILE} (expected a PEFT adapter folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not readable JSON ({e})") from e
    rank, alpha = _check_config(config, config_file)
    tensors = _read_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(
                f"{folder}: tensor {key!r} is not a LoRA A/B matrix (embedding LoRA, DoRA magnitudes, biases and "
                "modules_to_save are not supported)"
            )
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if not pairs:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA tensors")
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    modules = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{folder}: module {module!r} has lora_{''.join(parts)} but not both A and B")
        a, b = parts["A"].float(), parts["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{folder}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                "[r, in] and [out, r]"
            )
        r = a.shape[0]
        key = _pattern_key(alpha_pattern, module)
        module_alpha = float(alpha_pattern[key]) if key in alpha_pattern else alpha
        scale = module_alpha / math.sqrt(r) if use_rslora else module_alpha / r
        modules[module] = LoraPair(a.contiguous(), b.contiguous(), scale)
    return PeftAdapter(str(folder), rank, alpha, modules)


def _check_config(config: Any, config_file: Path) -> tuple[int, float]:
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"{config_file}: peft_type={peft_type!r}; only LoRA adapters (LORA) are supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{config_file}: r={rank!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise CheckpointError(f"{config_file}: lora_alpha={alpha!r} must be a number")
    bias = config.get("bias", "none")
    if bias != "none":
        raise CheckpointError(f"{config_file}: bias={bias!r}; trained biases are not supported (accepted: 'none')")
    refused = [name for name in _UNSUPPORTED_OPTIONS if config.get(name)]
    if refused:
        raise CheckpointError(f"{config_file}: {refused} are set; rtp-mm serves plain LoRA (A, B, alpha/r) only")
    return rank, float(alpha)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(file))
            # weights_only: a .bin adapter is a pickle, and an adapter path may come over HTTP (POST /update).
            return torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which
            raise CheckpointError(f"{file}: cannot read the adapter tensors ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"LoRA adapter {str(folder)!r} has none of {list(WEIGHT_FILES)}")


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): a pattern key matches a module name's dotted suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module
