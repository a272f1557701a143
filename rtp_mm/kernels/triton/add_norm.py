"""Fused residual add + RMSNorm / LayerNorm in Triton: ``(norm(x + residual), x + residual)`` in one pass.

The decoder's pre-norm layers do ``x = x + sublayer_out`` then ``norm(x)``: two reads and a write of the hidden state
that one kernel does in one read. The sum is rounded to the activation dtype (it is the residual stream the next
layer adds to, as in the unfused code) and normalised in fp32. RMSNorm matches ``decoder.RMSNorm``: the normalised
value is cast to the activation dtype before the weight multiplies it; LayerNorm matches ``nn.LayerNorm`` (fp32
statistics and affine, one rounding at the end). One program per row; the whole row is one tile.
"""

from __future__ import annotations

import torch

from rtp_mm.kernels.triton import launcher, next_power_of_2

try:  # optional: the module imports without triton; launcher() raises a clear error then
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None


def _add_norm_kernel(
    X,  # [rows, hidden]
    RESIDUAL,  # [rows, hidden] (HAS_RESIDUAL only)
    WEIGHT,  # [hidden]
    BIAS,  # [hidden] (HAS_BIAS only)
    OUT,  # [rows, hidden]
    SUM,  # [rows, hidden]: x + residual, the new residual (HAS_RESIDUAL only)
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * stride_x + cols, mask, 0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype, as the unfused ``x + residual`` is: it is also what the next layer adds to.
        x = (x.to(tl.float32) + tl.load(RESIDUAL + row * stride_r + cols, mask, 0.0).to(tl.float32)).to(x.dtype)
        tl.store(SUM + row * stride_s + cols, x, mask)
    xf = x.to(tl.float32)
    weight = tl.load(WEIGHT + cols, mask, 0.0)
    if RMS:
        normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
        # decoder.RMSNorm: weight * normed.to(x.dtype), the product in the promoted dtype (exact in fp32 for halves)
        out = normed.to(x.dtype).to(tl.float32) * weight.to(tl.float32)
    else:
        mean = tl.sum(xf, 0) / hidden
        centered = tl.where(mask, xf - mean, 0.0)
        normed = centered * tl.rsqrt(tl.sum(centered * centered, 0) / hidden + eps)
        out = normed * weight.to(tl.float32)
        if HAS_BIAS:
            out += tl.load(BIAS + cols, mask, 0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask)


def _add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape, hidden = x.shape, x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, hidden, dtype=out_dtype, device=x.device)
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(shape)} differ")
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        summed = torch.empty_like(x2)
    else:  # the first layer: nothing to add, the input itself is the residual
        r2, summed = x2, x2
    kernel = launcher(_add_norm_kernel, x.device)
    kernel[(rows,)](
        x2, r2, weight, weight if bias is None else bias, out, summed,
        x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
        hidden, eps,
        BLOCK=next_power_of_2(hidden),
        RMS=rms,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    return out.view(*shape[:-1], hidden), (x if residual is None else summed.view(shape))


def add_rms_norm(
    x: torch.Tensor,  # [..., hidden]: the sublayer's output (or the embeddings)
    residual: torch.Tensor | None,  # [..., hidden]: the residual stream; None = x is the stream
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (RMSNorm(x + residual), x + residual)
    """``decoder.RMSNorm(hidden, eps)`` (weight ``weight``) of ``x + residual``, and the sum."""
    return _add_norm(x, residual, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))


def add_layer_norm(
    x: torch.Tensor,  # [..., hidden]
    residual: torch.Tensor | None,  # [..., hidden]; None = x is the stream
    weight: torch.Tensor,  # [hidden]
    bias: torch.Tensor | None,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (LayerNorm(x + residual), x + residual)
    """``nn.LayerNorm(hidden, eps)`` (weight, bias) of ``x + residual``, and the sum."""
    return _add_norm(x, residual, weight, bias, eps, False, x.dtype)
