"""Writing an HF reference model's weights in the ORIGINAL on-disk layout of a legacy family (fused tensors and names
as the released checkpoints store them), with a config.json shaped like the real release."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], config: dict, generation_config: dict | None = None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return path


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize_biases(model: torch.nn.Module, std: float = 0.5, seed: int = 11) -> None:
    """HF initialisation leaves every bias at zero; non-zero biases make a wrong bias mapping visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotary buffer many 2023 checkpoints saved per layer (loaders must read and ignore it)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
