"""GLM-4V's vision stack (``chatglm4v``): EVA2-CLIP, a 2x2 conv downsample, a GLU projector and learned boi/eoi.

Facts of the original (glm-4v-9b ``visual.py`` / ``modeling_chatglm.py``, legacy-families.md §2.12):

- Preprocessing: ``convert('RGB')`` (alpha dropped, grey replicated), resize to ``image_size`` square with PIL
  bicubic (aspect ratio not kept, no crop), scale to [0, 1], normalise with the CLIP mean/std.
- EVA2-CLIP: patch conv (bias) -> prepend a CLS vector -> add the learned position table (``num_positions`` =
  grid^2 + 1 rows, never interpolated) -> blocks in post-sublayer-norm form ``x + LN(attn(x))``, ``x + LN(mlp(x))``
  (fused qkv ``[Q | K | V]`` with bias, non-causal attention, exact GELU MLP) -> CLS dropped.
- The grid goes through Conv2d(k=2, s=2) to the LLM width, then the GLU projector
  ``down(silu(gate(y)) * up(y))`` with ``y = gelu(LayerNorm(linear_proj(x)))`` (LayerNorm eps 1e-5, no biases).
- Learned ``boi`` / ``eoi`` rows frame the patches and everything is divided by ``scaling_factor``.
- Prompt: ``<|begin_of_image|> X <|end_of_image|>`` (X is ``<|endoftext|>`` in the chat template) is replaced by the
  ``grid^2 / 4 + 2`` rows. boi keeps its index p, every patch row gets p + 1, eoi and all later tokens keep their
  un-expanded index; decoding continues from the un-expanded length.

Weights are ``transformer.vision.*`` of the checkpoint, or the folder/file ``EXTRA_DATA_PATH`` names (same names, with
or without the ``transformer.vision.`` prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.errors import CheckpointError, InvalidRequest
from rtp_mm.llm.engine.multimodal import MultimodalInput, PreparedPrompt
from rtp_mm.vision.base import VisionModel, normalize_pixels

PREFIX = "transformer.vision."
BOI_ID, EOI_ID = 151339, 151340  # glm-4v-9b; config.json boi_token_id / eoi_token_id override them
_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class _Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [b, heads, n, d] each
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional over CLS + patches
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """EVA2-CLIP block: the norms sit after each sublayer, inside the residual branch."""

    def __init__(self, vc: dict[str, Any]):
        super().__init__()
        hidden, eps = vc["hidden_size"], vc.get("layer_norm_eps", 1e-6)
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = _Attention(hidden, vc["num_heads"])
        self.mlp = _MLP(hidden, vc["intermediate_size"], vc.get("hidden_act", "gelu"))
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class _PatchEmbedding(nn.Module):
    def __init__(self, vc: dict[str, Any]):
        super().__init__()
        hidden, patch = vc["hidden_size"], vc["patch_size"]
        self.proj = nn.Conv2d(vc.get("in_channels", 3), hidden, kernel_size=patch, stride=patch)
        self.cls_embedding = nn.Parameter(torch.zeros(1, hidden))
        self.position_embedding = nn.Embedding(vc["num_positions"], hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [b, grid*grid, hidden]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class _Transformer(nn.Module):
    def __init__(self, vc: dict[str, Any]):
        super().__init__()
        self.layers = nn.ModuleList(_Block(vc) for _ in range(vc["num_hidden_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _GLUProjector(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIP(nn.Module):
    """Pixels [b, 3, S, S] -> LLM rows [b, (S/patch/2)^2 + 2, llm_hidden]. Parameter names are the checkpoint's
    names below ``transformer.vision.``."""

    def __init__(self, vc: dict[str, Any], llm_hidden: int, llm_ffn: int):
        super().__init__()
        self.patch_embedding = _PatchEmbedding(vc)
        self.transformer = _Transformer(vc)
        self.conv = nn.Conv2d(vc["hidden_size"], llm_hidden, kernel_size=2, stride=2)
        self.linear_proj = _GLUProjector(llm_hidden, llm_ffn)
        self.boi = nn.Parameter(torch.zeros(1, 1, llm_hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, llm_hidden))
        self.scaling_factor = float(vc.get("scaling_factor", 8))
        self.grid = vc["image_size"] // vc["patch_size"]  # patches per side (a constant, not read off a traced shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # CLS dropped
        b, _, h = x.shape
        x = self.conv(x.view(b, self.grid, self.grid, h).permute(0, 3, 1, 2))  # [b, llm_hidden, grid/2, grid/2]
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat([self.boi.expand(b, 1, -1), x, self.eoi.expand(b, 1, -1)], dim=1)
        return x / self.scaling_factor


def preprocess_image(image: Any, size: int) -> torch.Tensor:
    """PIL image -> [3, size, size] float32, exactly the original's RGB / bicubic resize / CLIP-normalise."""
    from PIL import Image

    return normalize_pixels(image.convert("RGB").resize((size, size), Image.BICUBIC))


def image_positions(prompt_ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Positions of the expanded prompt: every token keeps its un-expanded index; the middle token of span
    (boi index, number of patch rows) is repeated, so all patch rows share boi's index + 1."""
    repeat = {boi + 1: n for boi, n in spans}
    positions: list[int] = []
    for i in range(len(prompt_ids)):
        positions.extend([i] * repeat.get(i, 1))
    return positions


class GLM4VVision(VisionModel):
    """Invariant: ``encode`` returns ``num_patches + 2`` rows per image (boi, patches, eoi) in the LLM dtype."""

    family = "chatglm4v"

    def __init__(self, model: EVA2CLIP, image_size: int, boi_id: int, eoi_id: int, dtype: torch.dtype):
        self.model = model
        self.image_size = image_size
        self.boi_id, self.eoi_id = boi_id, eoi_id
        self.dtype = dtype
        self.device = model.boi.device

    def preprocess(self, image: Any) -> torch.Tensor:
        return preprocess_image(image, self.image_size)

    def visual_module(self) -> EVA2CLIP:
        return self.model

    def pixel_shape(self) -> tuple[int, int, int]:
        return (self.model.patch_embedding.proj.in_channels, self.image_size, self.image_size)

    def stack(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pixel_values).to(self.device, self.dtype)

    def unstack(self, pixel_values: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
        return list(features.unbind(0))

    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        boi_at = [i for i, t in enumerate(prompt_ids) if t == self.boi_id]
        eoi_at = [i for i, t in enumerate(prompt_ids) if t == self.eoi_id]
        for i in boi_at:
            if i + 2 >= len(prompt_ids) or prompt_ids[i + 2] != self.eoi_id:
                raise InvalidRequest(
                    f"the image span at token {i} is not closed: <|begin_of_image|> (id {self.boi_id}) must be "
                    f"followed by exactly one token and <|end_of_image|> (id {self.eoi_id})"
                )
        if len(eoi_at) != len(boi_at):
            raise InvalidRequest(f"the prompt has {len(eoi_at)} <|end_of_image|> ids for {len(boi_at)} image spans")
        if len(boi_at) != len(embeds):
            raise InvalidRequest(
                f"number of image spans (<|begin_of_image|><|endoftext|><|end_of_image|>) in the prompt "
                f"({len(boi_at)}) does not match the number of images ({len(embeds)})"
            )
        token_ids: list[int] = []
        mm_inputs: list[MultimodalInput] = []
        spans: list[tuple[int, int]] = []
        prev = 0
        for boi, rows, key in zip(boi_at, embeds, hashes, strict=True):
            token_ids += prompt_ids[prev : boi + 1]
            num_patches = rows.shape[0] - 2
            mm_inputs.append(MultimodalInput(rows, len(token_ids) - 1, key))
            token_ids += [prompt_ids[boi + 1]] * num_patches + [self.eoi_id]
            spans.append((boi, num_patches))
            prev = boi + 3
        token_ids += prompt_ids[prev:]
        return PreparedPrompt(token_ids, mm_inputs, image_positions(prompt_ids, spans) if spans else None)

    def image_placeholder(self, index: int) -> str:
        return "<|begin_of_image|><|endoftext|><|end_of_image|>"


def vision_tensors(ckpt_path: str, extra_data_path: str = "") -> dict[str, torch.Tensor]:
    """The vision tensors, named below ``transformer.vision.``: from EXTRA_DATA_PATH when given, else the checkpoint."""
    from rtp_mm.llm.loader.checkpoint import open_checkpoint

    source = extra_data_path or ckpt_path
    ckpt = open_checkpoint(source)
    try:
        names = [k for k in ckpt.keys() if k.startswith(PREFIX)]
        if names:
            return {k[len(PREFIX) :]: ckpt.get(k) for k in names}
        if extra_data_path:
            return {k: ckpt.get(k) for k in ckpt.keys()}
    finally:
        ckpt.close()
    raise CheckpointError(f"{source}: no {PREFIX}* tensors (the GLM-4V vision tower); set EXTRA_DATA_PATH to them")


def _check_vision_config(config: dict[str, Any]) -> dict[str, Any]:
    vc = config.get("vision_config")
    need = ("hidden_size", "num_hidden_layers", "num_heads", "intermediate_size", "patch_size", "image_size")
    if not isinstance(vc, dict) or any(not isinstance(vc.get(k), int) for k in need + ("num_positions",)):
        raise CheckpointError(f"config.json vision_config must be an object with integer fields {list(need)}")
    grid = vc["image_size"] // vc["patch_size"]
    if vc["num_positions"] != grid * grid + 1 or grid % 2:
        raise CheckpointError(
            f"config.json vision_config: image_size {vc['image_size']} / patch_size {vc['patch_size']} gives a "
            f"{grid}x{grid} grid, which needs num_positions = {grid * grid + 1} (got {vc['num_positions']}) and an "
            "even grid for the 2x2 downsample"
        )
    if vc.get("hidden_act", "gelu") not in _ACTIVATIONS:
        raise CheckpointError(
            f"config.json vision_config.hidden_act={vc['hidden_act']!r}; accepted: {list(_ACTIVATIONS)}"
        )
    return vc


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; every parameter must be present with its exact shape, nothing left over."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise CheckpointError(f"{source}: vision weights missing {missing[:5]}, unexpected {unknown[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[name]
            if t.shape != param.shape:
                raise CheckpointError(
                    f"{source}: {PREFIX}{name} has shape {tuple(t.shape)}, the config needs {tuple(param.shape)}"
                )
            param.copy_(t)


def load(ckpt_path: str, config: dict, extra_data_path: str, device: str, dtype: torch.dtype) -> GLM4VVision:
    vc = _check_vision_config(config)
    ffn = config.get("ffn_hidden_size")
    if not isinstance(ffn, int) or not isinstance(config.get("hidden_size"), int):
        raise CheckpointError("config.json needs integer hidden_size and ffn_hidden_size (the GLU projector's sizes)")
    model = EVA2CLIP(vc, config["hidden_size"], ffn)
    load_state(model, vision_tensors(ckpt_path, extra_data_path), str(Path(extra_data_path or ckpt_path)))
    model = model.to(device=device, dtype=dtype).eval()
    boi, eoi = config.get("boi_token_id", BOI_ID), config.get("eoi_token_id", EOI_ID)
    return GLM4VVision(model, vc["image_size"], boi, eoi, dtype)
