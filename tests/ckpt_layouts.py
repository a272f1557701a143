"""Writing tiny reference models in the ORIGINAL on-disk layout of a MODEL_TYPE (names, fused tensors, config.json
as the real releases ship them), so that loading is tested against real layouts rather than transformers' own."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: random init leaves biases at 0 and norms at 1, which would hide layout bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict, **extra_json: dict) -> Path:
    """``model.safetensors`` + ``config.json`` (+ any ``name.json`` given as keyword ``name=...``)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, value in extra_json.items():
        (path / f"{name}.json").write_text(json.dumps(value, indent=2))
    return path


def interleave_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[Q | K | V] pieces (weight or bias) -> the per-head ``[q_h, k_h, v_h]`` rows of BLOOM/NeoX/MHA Falcon."""
    parts = [x.reshape(num_heads, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])


def split_per_head(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_per_head, written independently of rtp-mm's transforms."""
    x = fused.reshape(num_heads, 3, -1, *fused.shape[1:])
    return tuple(x[:, j].reshape(-1, *fused.shape[1:]) for j in range(3))  # type: ignore[return-value]
