"""Qwen-VL's vision stack: a ViT, a 256-query attention resampler, ``ln_post`` and ``proj``.

Facts of the original (``visual.py`` of Qwen-VL-Chat, config ``config.json["visual"]``):

- Preprocessing: RGB, resize to ``image_size`` x ``image_size`` with PIL bicubic (aspect ratio not kept, no crop),
  /255, CLIP mean/std.
- ViT: ``conv1`` (patch conv, no bias), no CLS token; a learned ``positional_embedding`` of 256 rows (a 16x16 grid)
  bicubically resized (fp32, align_corners False) to the patch grid; ``ln_pre``; pre-norm blocks (LayerNorm eps
  1e-6, exact GELU MLP ``c_fc``/``c_proj`` of width ``int(width * mlp_ratio)``). The attention's fused ``in_proj``
  is **per-head interleaved**: rows grouped ``[q_h, k_h, v_h]`` for each head. We regroup it to ``[Q; K; V]`` once at
  load time so the forward is plain scaled-dot-product attention.
- Resampler (``attn_pool``): ``kv_proj`` (no bias) then ``ln_kv``; 256 learned queries through ``ln_q``; one
  ``nn.MultiheadAttention`` (``output_dim / 128`` heads, ``[Q; K; V]`` in_proj with bias) whose query is
  ``ln_q(query) + pos`` and key ``kv + pos`` resized to the patch grid, value ``kv``. ``pos`` is a fixed 2D sin-cos
  table the original stores in the checkpoint (``attn_pool.pos_embed``); we rebuild it when a weight file lacks it.
- ``ln_post`` (eps 1e-6) then ``@ proj``: 256 rows of the LM's hidden size per image.

Prompt side: ``<img>`` (``visual.image_start_id``), ``</img>`` (+1) and ``<imgpad>`` (+2). The Qwen-VL tokenizer writes
``<img>``, the UTF-8 bytes of the image reference as ids 0-255, ``<imgpad>`` up to 256 ids, ``</img>``; the model
overwrites what lies between the tags with the image's 256 rows (the tags keep their text embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.errors import CheckpointError, InvalidRequest
from rtp_mm.llm.engine.multimodal import MultimodalInput, PreparedPrompt
from rtp_mm.vision.base import VisionModel, normalize_pixels

N_QUERIES = 256  # fixed by the original code (not a config field)
LN_EPS = 1e-6
PREFIXES = ("transformer.visual.", "visual.")


@dataclass(frozen=True)
class QwenVisualConfig:
    """``config.json["visual"]``; ``llm_hidden`` is the LM's hidden size, which ``output_dim`` must equal."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    image_start_id: int
    llm_hidden: int

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise CheckpointError(
                f"config.json visual.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise CheckpointError(f"config.json visual.width={self.width} is not a multiple of heads={self.heads}")
        if self.output_dim % 128:
            raise CheckpointError(
                f"config.json visual.output_dim={self.output_dim} must be a multiple of 128 (resampler heads of 128)"
            )
        if self.output_dim != self.llm_hidden:
            raise CheckpointError(
                f"config.json visual.output_dim={self.output_dim} != hidden_size={self.llm_hidden}: the image rows "
                "must be in the LM's embedding space"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QwenVisualConfig:
        visual = config.get("visual")
        if not isinstance(visual, dict):
            raise CheckpointError("config.json has no 'visual' object: not a Qwen-VL checkpoint")
        names = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim", "image_start_id")
        missing = [n for n in names if n not in visual]
        if missing:
            raise CheckpointError(f"config.json visual lacks {missing}")
        return cls(**{n: visual[n] for n in names}, llm_hidden=int(config.get("hidden_size", visual["output_dim"])))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The resampler's fixed position table [grid*grid, dim] (MAE-style): the first half of the channels encodes
    the column index, the second half the row index, each as [sin | cos] over ``1 / 10000^(k / (dim/4))``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(cols), one_axis(rows)], axis=1)).float()


def resize_positions(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """A square table [n, C] bicubically resized to [num_patches, C], in fp32 as the original does."""
    src, dst = math.isqrt(pos.shape[0]), math.isqrt(num_patches)
    if src == dst:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class ViTBlock(nn.Module):
    """Pre-norm block; ``qkv`` holds the in_proj regrouped to [Q; K; V]."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, patches, width]
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v)  # [batch, heads, patches, head_dim]
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class QwenVisual(nn.Module):
    """ViT + resampler + ln_post + proj: pixel values [batch, 3, S, S] -> [batch, 256, output_dim]."""

    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        w, d = cfg.width, cfg.output_dim
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, w))  # a 16x16 grid, resized to the patch grid
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS)
        self.blocks = nn.ModuleList(ViTBlock(w, cfg.heads, cfg.mlp_width) for _ in range(cfg.layers))
        self.pool_heads = d // 128
        self.query = nn.Parameter(torch.empty(N_QUERIES, d))
        self.pos_embed = nn.Parameter(torch.empty(N_QUERIES, d))
        self.kv_proj = nn.Linear(w, d, bias=False)
        self.ln_q = nn.LayerNorm(d, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(d, eps=LN_EPS)
        self.pool_qkv = nn.Linear(d, 3 * d)
        self.pool_out = nn.Linear(d, d)
        self.ln_post = nn.LayerNorm(d, eps=LN_EPS)
        self.proj = nn.Parameter(torch.empty(d, d))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [batch, patches, width]
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(self.resample(x)) @ self.proj

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the 256 queries over the patches (torch's MultiheadAttention maths, batch-first)."""
        b, n, _ = x.shape
        d, h = self.pos_embed.shape[1], self.pool_heads
        kv = self.ln_kv(self.kv_proj(x))  # [batch, patches, d]
        query = (self.ln_q(self.query) + self.pos_embed).expand(b, -1, -1)
        key = kv + resize_positions(self.pos_embed, n)
        wq, wk, wv = self.pool_qkv.weight.chunk(3)
        bq, bk, bv = self.pool_qkv.bias.chunk(3)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [batch, len, d] -> [batch, heads, len, d/heads]
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(key, wk, bk)), heads(F.linear(kv, wv, bv))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N_QUERIES, d)
        return self.pool_out(out)


def _interleaved_to_qkv(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """in_proj rows [heads, (q|k|v), head_dim] (the original's per-head view) -> [(q|k|v), heads, head_dim]."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(weight.shape)


def state_dict_from_checkpoint(
    tensors: dict[str, torch.Tensor], cfg: QwenVisualConfig, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The original ``visual.*`` names (prefix stripped) -> QwenVisual's names, checking coverage and every shape
    against ``shapes`` (QwenVisual's own, from the config)."""
    table = {
        "conv1.weight": "conv1.weight",
        "positional_embedding": "positional_embedding",
        "ln_pre.weight": "ln_pre.weight",
        "ln_pre.bias": "ln_pre.bias",
        "attn_pool.query": "query",
        "attn_pool.pos_embed": "pos_embed",
        "attn_pool.kv_proj.weight": "kv_proj.weight",
        "attn_pool.attn.in_proj_weight": "pool_qkv.weight",
        "attn_pool.attn.in_proj_bias": "pool_qkv.bias",
        "attn_pool.attn.out_proj.weight": "pool_out.weight",
        "attn_pool.attn.out_proj.bias": "pool_out.bias",
        "ln_post.weight": "ln_post.weight",
        "ln_post.bias": "ln_post.bias",
        "proj": "proj",
    }
    for ln in ("ln_q", "ln_kv"):
        for p in ("weight", "bias"):
            table[f"attn_pool.{ln}.{p}"] = f"{ln}.{p}"
    block_names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.in_proj": "qkv", "attn.out_proj": "out_proj"}
    block_names |= {"mlp.c_fc": "c_fc", "mlp.c_proj": "c_proj"}
    for i in range(cfg.layers):
        for src, dst in block_names.items():
            for p in ("weight", "bias"):
                table[f"transformer.resblocks.{i}.{src}.{p}"] = f"blocks.{i}.{dst}.{p}"
    tensors = dict(tensors)
    if "attn_pool.pos_embed" not in tensors:  # a fixed table: rebuild it when a weight file leaves it out
        tensors["attn_pool.pos_embed"] = sincos_2d(cfg.output_dim, math.isqrt(N_QUERIES))
    missing = sorted(set(table) - set(tensors))
    unknown = sorted(set(tensors) - set(table))
    if missing or unknown:
        raise CheckpointError(
            f"Qwen-VL visual weights do not match config.json visual (layers={cfg.layers}): missing {missing[:6]}, "
            f"unexpected {unknown[:6]}"
        )
    for src, dst in table.items():
        if tuple(tensors[src].shape) != shapes[dst]:
            raise CheckpointError(
                f"visual weight {src} has shape {tuple(tensors[src].shape)}; config.json visual implies {shapes[dst]}"
            )
    out = {dst: tensors[src] for src, dst in table.items()}
    for i in range(cfg.layers):
        for p in ("weight", "bias"):
            name = f"blocks.{i}.qkv.{p}"
            out[name] = _interleaved_to_qkv(out[name], cfg.heads)
    return out


def read_visual_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every ``transformer.visual.*`` (or ``visual.*``) tensor of a checkpoint folder, prefix stripped."""
    from rtp_mm.llm.loader import open_checkpoint

    ckpt = open_checkpoint(folder)
    try:
        found: dict[str, torch.Tensor] = {}
        for name in ckpt.keys():
            prefix = next((p for p in PREFIXES if name.startswith(p)), None)
            if prefix is not None:
                found[name[len(prefix) :]] = ckpt.get(name)
    finally:
        ckpt.close()
    if not found:
        raise CheckpointError(f"{folder}: no Qwen-VL visual weights (transformer.visual.* or visual.*)")
    return found


class QwenVLVision(VisionModel):
    """Invariant: ``encode`` returns [256, output_dim] per image in ``dtype``; ``expand`` keeps the prompt length
    when each span holds exactly 256 ids (what the tokenizer writes)."""

    family = "qwen_vl"

    def __init__(self, cfg: QwenVisualConfig, visual: QwenVisual, device: str | torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.visual = visual.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.image_start_id = cfg.image_start_id
        self.image_end_id = cfg.image_start_id + 1
        self.image_pad_id = cfg.image_start_id + 2

    def preprocess(self, image: Any) -> torch.Tensor:
        """[3, S, S] float32: RGB (alpha dropped, grey replicated), PIL bicubic resize, /255, CLIP mean/std."""
        from PIL import Image

        size = self.cfg.image_size
        rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
        return normalize_pixels(rgb)

    def visual_module(self) -> QwenVisual:
        return self.visual

    def pixel_shape(self) -> tuple[int, int, int]:
        return (3, self.cfg.image_size, self.cfg.image_size)

    def stack(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pixel_values).to(device=self.device, dtype=self.dtype)

    def unstack(self, pixel_values: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
        return list(features.unbind(0))

    def image_spans(self, prompt_ids: list[int]) -> list[tuple[int, int]]:
        """(index of ``<img>``, index of ``</img>``) of each span; a nested, stray or unclosed tag is an error."""
        spans: list[tuple[int, int]] = []
        start: int | None = None
        for i, t in enumerate(prompt_ids):
            if t == self.image_start_id:
                if start is not None:
                    raise InvalidRequest(f"image span opened at token {start} is not closed before <img> at {i}")
                start = i
            elif t == self.image_end_id:
                if start is None:
                    raise InvalidRequest(f"</img> at token {i} closes no <img> span")
                spans.append((start, i))
                start = None
        if start is not None:
            raise InvalidRequest(f"image span opened at token {start} is not closed by </img> (id {self.image_end_id})")
        return spans

    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        """Each span's content becomes the 256 rows of its image. Contents of another length (a hand-made id
        prompt) are replaced by 256 ``<imgpad>`` ids, as RTP-LLM resizes a separator pair's content to the rows."""
        spans = self.image_spans(prompt_ids)
        if len(spans) != len(embeds):
            raise InvalidRequest(
                f"the prompt has {len(spans)} <img>...</img> spans but {len(embeds)} images were given: "
                "the numbers must match"
            )
        ids: list[int] = []
        mm_inputs: list[MultimodalInput] = []
        prev = 0
        for (start, end), rows, content_hash in zip(spans, embeds, hashes, strict=True):
            ids += prompt_ids[prev : start + 1]
            inner = prompt_ids[start + 1 : end]
            if len(inner) != rows.shape[0]:
                inner = [self.image_pad_id] * rows.shape[0]
            mm_inputs.append(MultimodalInput(rows, len(ids), content_hash))
            ids += inner
            prev = end
        ids += prompt_ids[prev:]
        return PreparedPrompt(ids, mm_inputs)

    def image_placeholder(self, index: int) -> str:
        """What Qwen-VL's chat format writes for an image (``Picture k: <img>ref</img>\\n``, k from 1). The reference
        inside the tags only fills ids that the image rows overwrite; the image itself comes with the request."""
        return f"Picture {index + 1}: <img>image_{index + 1}</img>\n"


def load_qwen_vl(
    ckpt_path: str, config: dict, extra_data_path: str, device: str | torch.device, dtype: torch.dtype
) -> QwenVLVision:
    """Visual weights from ``EXTRA_DATA_PATH`` when set (a folder or weight file holding ``transformer.visual.*``
    or ``visual.*``), else from the checkpoint itself; the architecture from the checkpoint's ``config.json``."""
    cfg = QwenVisualConfig.from_config(config)
    source = extra_data_path or ckpt_path
    if extra_data_path and not Path(extra_data_path).exists():
        raise CheckpointError(f"EXTRA_DATA_PATH={extra_data_path!r} does not exist")
    with torch.device("meta"):
        visual = QwenVisual(cfg)
    shapes = {name: tuple(t.shape) for name, t in visual.state_dict().items()}
    state = state_dict_from_checkpoint(read_visual_tensors(source), cfg, shapes)
    visual.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return QwenVLVision(cfg, visual, device, dtype)
