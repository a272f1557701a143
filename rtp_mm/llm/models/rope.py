"""Rotary position embeddings: NeoX (rotate-half) and interleaved pairs, over a full or partial head dim, with the
scaling types of HF/RTP-LLM (linear, dynamic NTK, YaRN, llama3) and Qwen v1's dynamic NTK.

cos/sin are computed per step from the token positions in float32 (a [tokens, rotary_dim / 2] product, cheap),
which also lets dynamic scaling use each sequence's own current length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    dim: int = 0  # rotated dims of each head (<= head_dim); 0 = the full head
    interleaved: bool = False  # adjacent pairs (GPT-J/GLM2) instead of rotate-half (NeoX)
    scaling: str = "none"  # none | linear | dynamic | yarn | llama3 | qwen_ntk
    factor: float = 1.0
    original_max_position: int = 0  # context the model was trained on (dynamic/yarn/llama3/qwen_ntk)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn cos/sin multiplier; None = derived from factor
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    two_d: bool = False  # GLM v1: each head half is its own rotate-half rotary, by position and by block position
    fp16_inv_freq: bool = False  # GLM v1/130B build inv_freq in fp16 even when running in fp32


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = spec.theta, spec.factor
    if spec.attention_factor is not None:
        attention_factor = spec.attention_factor
    elif spec.mscale and spec.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, spec.mscale) / _yarn_mscale(factor, spec.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(spec.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # weight of the original (high-frequency) band
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(spec: RopeSpec, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(spec.theta, dim)
    old_len = spec.original_max_position
    low_wavelen = old_len / spec.low_freq_factor
    high_wavelen = old_len / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Applies rotary embeddings to q/k of shape [tokens, heads, head_dim] at given positions."""

    def __init__(self, spec: RopeSpec, head_dim: int):
        super().__init__()
        self.spec = spec
        self.dim = spec.dim or head_dim
        self.attention_factor = 1.0
        if spec.scaling == "yarn":
            inv_freq, self.attention_factor = _yarn(spec, self.dim)
        elif spec.scaling == "llama3":
            inv_freq = _llama3(spec, self.dim)
        else:
            # 2D: the frequencies of one head half, shared by both halves.
            inv_freq = _base_inv_freq(spec.theta, self.dim // 2 if spec.two_d else self.dim)
        if spec.fp16_inv_freq:
            inv_freq = inv_freq.half().float()
        # A plain attribute, not a buffer: the model is built on the meta device and these must stay real.
        self.inv_freq = inv_freq

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor | None:
        """Per-sequence frequencies for the length-dependent scalings (None: use the static ones)."""
        spec, dim = self.spec, self.dim
        if spec.scaling == "dynamic" and seq_len > spec.original_max_position:
            base = spec.theta * ((spec.factor * seq_len / spec.original_max_position) - (spec.factor - 1)) ** (
                dim / (dim - 2)
            )
            return _base_inv_freq(base, dim).to(self.inv_freq.device)
        if spec.scaling == "qwen_ntk" and seq_len > spec.original_max_position:
            context = math.log(seq_len / spec.original_max_position, 2) + 1
            ntk_alpha = max(2 ** math.ceil(context) - 1, 1)
            base = spec.theta * ntk_alpha ** (dim / (dim - 2))
            return _base_inv_freq(base, dim).to(self.inv_freq.device)
        return None

    def cos_sin(
        self,
        positions: torch.Tensor,
        seq_lens: torch.Tensor | None = None,
        for_dtype: torch.dtype | None = None,
        prompt_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [tokens, dim / 2] in float32, or [tokens, 1, dim / 2] in ``for_dtype``. ``seq_lens`` [tokens]:
        each token's sequence length after this step, used by the dynamic scalings. With ``two_d`` positions are
        [tokens, 2] (position, block position) and the halves of the last dim belong to each; plain [tokens]
        positions then mean block position 0 (context tokens). ``prompt_lens`` [tokens]: each token's prompt length;
        Qwen v1 picks its NTK alpha once from the prompt and keeps it while decoding, so ``qwen_ntk`` uses these when
        given (cached keys and new queries then share one alpha)."""
        if self.spec.two_d and positions.dim() == 1:
            positions = torch.stack((positions, torch.zeros_like(positions)), dim=-1)
        if prompt_lens is not None and self.spec.scaling == "qwen_ntk":
            seq_lens = prompt_lens
        pos = positions.to(torch.float32)
        if self.spec.scaling == "linear":
            pos = pos / self.spec.factor
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = (pos[..., None] * self.inv_freq).flatten(1)  # 2D: [position freqs | block position freqs]
        if seq_lens is not None and self.spec.scaling in ("dynamic", "qwen_ntk"):
            for length in torch.unique(seq_lens).tolist():
                inv_freq = self._dynamic_inv_freq(int(length))
                if inv_freq is not None:
                    rows = seq_lens == length
                    freqs[rows] = pos[rows][:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if for_dtype is not None:  # shaped and cast once per step for every layer's apply()
            if not self.spec.interleaved and not self.spec.two_d:
                # Rotate-half tables over the whole rotary width, [cos | cos] and [-sin | sin]: apply() then needs
                # three elementwise ops instead of six (a decode step applies rope in every layer).
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
            return cos[:, None, :].to(for_dtype), sin[:, None, :].to(for_dtype)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] -> rotated copy (the first ``dim`` dims rotated, the rest passed through).
        cos/sin: ``cos_sin(..., for_dtype=x.dtype)``: [tokens, 1, dim / 2], or for the plain rotate-half layout the
        full-width tables [tokens, 1, dim] ([cos | cos], [-sin | sin]; the same products and sums, bit for bit)."""
        dim = self.dim
        if self.spec.two_d:  # [tokens, heads, 2 halves, dim / 2], each half rotated by its own cos/sin
            halves, quarter = x.unflatten(-1, (2, dim // 2)), dim // 4
            c, s = cos.unflatten(-1, (2, quarter)), sin.unflatten(-1, (2, quarter))
            x1, x2 = halves[..., :quarter], halves[..., quarter:]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        if x.shape[-1] == dim:
            rot, rest = x, x[..., :0]
        else:
            rot, rest = x[..., :dim], x[..., dim:]
        if self.spec.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        elif cos.shape[-1] == dim:
            half = dim // 2
            out = rot * cos + torch.cat((rot[..., half:], rot[..., :half]), dim=-1) * sin
        else:
            half = dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
