"""The CLIP vision transformer (HF ``CLIPVisionModel`` maths and parameter names), run only up to the layer whose
hidden states a multimodal model reads.

LLaVA reads ``hidden_states[k]`` (the input of layer k, after ``pre_layrnorm``; default -2 = the penultimate layer's
output), so the last layers and ``post_layernorm`` are never needed: they are not even built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.errors import CheckpointError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, what: str) -> Any:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{what}={name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class ClipVisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.image_size % self.patch_size:
            raise CheckpointError(
                f"CLIP vision config: hidden_size={self.hidden_size} must divide by num_attention_heads="
                f"{self.num_heads} and image_size={self.image_size} by patch_size={self.patch_size}"
            )
        activation(self.hidden_act, "CLIP vision_config.hidden_act")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ClipVisionSpec:
        """From a CLIPVisionConfig dict; fields it omits take CLIPVisionConfig's defaults (llava-hf configs omit
        every field equal to them)."""
        from transformers import CLIPVisionConfig

        model_type = config.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise CheckpointError(f"vision_config.model_type={model_type!r} is not supported (clip_vision_model)")
        fields = {k: v for k, v in config.items() if k != "model_type"}
        full = CLIPVisionConfig(**fields)
        return cls(
            hidden_size=full.hidden_size,
            intermediate_size=full.intermediate_size,
            num_layers=full.num_hidden_layers,
            num_heads=full.num_attention_heads,
            image_size=full.image_size,
            patch_size=full.patch_size,
            hidden_act=full.hidden_act,
            layer_norm_eps=full.layer_norm_eps,
            num_channels=full.num_channels,
        )


class ClipLayer(nn.Module):
    def __init__(self, spec: ClipVisionSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.self_attn = nn.ModuleDict({p: nn.Linear(h, h) for p in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(h, spec.intermediate_size), "fc2": nn.Linear(spec.intermediate_size, h)}
        )
        self.layer_norm2 = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.act = ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, tokens, hidden]
        b, n, h = x.shape
        y = self.layer_norm1(x)
        attn = self.self_attn
        q, k, v = (attn[p](y).view(b, n, self.num_heads, -1).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
        y = F.scaled_dot_product_attention(q, k, v)  # full (bidirectional) attention over CLS + patches
        x = x + attn["out_proj"](y.transpose(1, 2).reshape(b, n, h))
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))


class ClipVisionTower(nn.Module):
    """CLIP's ViT truncated after ``num_layers_run`` layers. Invariant: parameter names equal HF's under
    ``vision_model.`` (minus the unused tail), so a state dict loads by name with every shape checked."""

    def __init__(self, spec: ClipVisionSpec, num_layers_run: int):
        super().__init__()
        self.spec = spec
        h, p = spec.hidden_size, spec.patch_size
        num_positions = spec.patches_per_side**2 + 1
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(spec.num_channels, h, kernel_size=p, stride=p, bias=False)
        self.embeddings.class_embedding = nn.Parameter(torch.empty(h))
        self.embeddings.position_embedding = nn.Embedding(num_positions, h)
        self.pre_layrnorm = nn.LayerNorm(h, eps=spec.layer_norm_eps)  # (sic) HF's name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipLayer(spec) for _ in range(num_layers_run))

    def forward(self, pixel_values: torch.Tensor, feature_layers: tuple[int, ...]) -> torch.Tensor:
        """[batch, 3, S, S] -> ``hidden_states[k]`` for each k of ``feature_layers`` (HF indexing: 0 = the
        embeddings after pre_layrnorm, -1 = the last layer's output), concatenated: [batch, 1 + patches, k*hidden]."""
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        x = self.pre_layrnorm(torch.cat([cls, patches], dim=1) + emb.position_embedding.weight)
        states = [x]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        count = self.spec.num_layers + 1
        return torch.cat([states[k % count] for k in feature_layers], dim=-1)


def layers_to_run(spec: ClipVisionSpec, feature_layers: tuple[int, ...]) -> int:
    """How many layers produce ``hidden_states[k]`` for every k in ``feature_layers`` (HF indexing: 0 = the
    embeddings, -1 = the last layer's output)."""
    count = spec.num_layers + 1
    if any(not -count <= k < count for k in feature_layers):
        raise CheckpointError(
            f"vision feature layer(s) {list(feature_layers)} out of range for a {spec.num_layers}-layer CLIP tower"
        )
    return max(k % count for k in feature_layers)
