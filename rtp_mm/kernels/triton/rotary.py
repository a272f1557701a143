"""Rotary embedding in Triton: the variants of ``rope.RotaryEmbedding.apply`` over a [tokens, heads, head_dim] tensor.

Every variant is one rule: output element ``i`` of the rotated width is ``x[i] * cos[c(i)] + sign(i) * x[p(i)] *
sin[c(i)]``, with the partner ``p``, the sign and the table column ``c`` given by the layout:

- rotate-half (NeoX): pairs (i, i + dim/2); ``x1 * cos - x2 * sin`` for the first half, ``x2 * cos + x1 * sin``
  for the second;
- interleaved (GPT-J, GLM2): pairs (2j, 2j + 1) with column j;
- GLM v1's 2D: each half of the head is its own rotate-half rotary with its own quarter of the table (position,
  then block position);
- partial rotary: elements past ``rotary_dim`` pass through unchanged.

The kernel takes half-width tables [tokens, rotary_dim / 2] (the wrapper reduces the rotate-half layout's full-width
``[cos | cos]``, ``[-sin | sin]`` tables to them) and computes in fp32; one program per (token, tile of heads).
"""

from __future__ import annotations

import torch

from rtp_mm.kernels.triton import launcher, next_power_of_2

try:  # optional: the module imports without triton; launcher() raises a clear error then
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None

HEADS_PER_PROGRAM = 4


def _rotary_kernel(
    X,  # [tokens, heads, head_dim]
    COS,  # [tokens, rotary_dim / 2]
    SIN,
    OUT,  # [tokens, heads, head_dim], contiguous
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    heads,
    head_dim,
    rotary_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    TWO_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    rotated = i < rotary_dim
    if INTERLEAVED:
        column = i // 2
        first = i % 2 == 0
        partner = tl.where(first, i + 1, i - 1)
    else:
        # Rotate-half over a span of ``span`` elements: the whole rotary width, or (2D) one half of it.
        span = rotary_dim // 2 if TWO_D else rotary_dim
        half = span // 2
        local = i % span
        first = local < half
        partner = tl.where(first, i + half, i - half)
        column = (i // span) * half + local % half
    mask = (h < heads)[:, None] & (i < head_dim)[None, :]
    row = X + token * stride_xt + h[:, None] * stride_xh
    x = tl.load(row + i[None, :], mask, 0.0).to(tl.float32)
    x_partner = tl.load(row + partner[None, :], mask & rotated[None, :], 0.0).to(tl.float32)
    cos = tl.load(COS + token * stride_ct + column, rotated, 1.0).to(tl.float32)
    sin = tl.load(SIN + token * stride_st + column, rotated, 0.0).to(tl.float32)
    signed_sin = tl.where(first, -sin, sin)
    out = x * cos[None, :] + x_partner * signed_sin[None, :]  # cos 1, sin 0 past rotary_dim: x passes through
    out_ptrs = OUT + token * heads * head_dim + h[:, None] * head_dim + i[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask)


def _half_width(table: torch.Tensor, tokens: int, rotary_dim: int, is_sin: bool) -> torch.Tensor:
    """cos/sin as [tokens, rotary_dim / 2]. Accepts [tokens, w] or [tokens, 1, w]; w = rotary_dim is the rotate-half
    layout's full-width table ([cos | cos] or [-sin | sin]), whose second half is the plain table."""
    table = table.reshape(tokens, table.shape[-1])
    if table.shape[-1] == rotary_dim:
        table = table[:, rotary_dim // 2 :]
    elif table.shape[-1] != rotary_dim // 2:
        name = "sin" if is_sin else "cos"
        raise ValueError(f"{name} has {table.shape[-1]} columns; expected {rotary_dim // 2} or {rotary_dim}")
    return table


def apply_rotary(
    x: torch.Tensor,  # [tokens, heads, head_dim]
    cos: torch.Tensor,  # [tokens, 1, w] or [tokens, w]: RotaryEmbedding.cos_sin's tables
    sin: torch.Tensor,
    rotary_dim: int,  # RotaryEmbedding.dim
    interleaved: bool = False,  # RopeSpec.interleaved
    two_d: bool = False,  # RopeSpec.two_d
) -> torch.Tensor:  # rotated copy of x
    """``RotaryEmbedding(spec, head_dim).apply(x, cos, sin)`` with ``rotary_dim = .dim``, ``interleaved`` and
    ``two_d`` from its spec."""
    tokens, heads, head_dim = x.shape
    if rotary_dim > head_dim or rotary_dim % (4 if two_d else 2):
        raise ValueError(f"rotary_dim {rotary_dim} must be even (2D: a multiple of 4) and <= head_dim {head_dim}")
    if interleaved and two_d:
        raise ValueError("a rotary is either interleaved or GLM's 2D, not both")
    full_width = not interleaved and not two_d
    cos = _half_width(cos, tokens, rotary_dim, False) if full_width else cos.reshape(tokens, rotary_dim // 2)
    sin = _half_width(sin, tokens, rotary_dim, True) if full_width else sin.reshape(tokens, rotary_dim // 2)
    if x.stride(2) != 1:
        x = x.contiguous()
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    block_h = min(HEADS_PER_PROGRAM, next_power_of_2(heads))
    kernel = launcher(_rotary_kernel, x.device)
    kernel[(tokens, -(-heads // block_h))](
        x, cos, sin, out,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        heads, head_dim, rotary_dim,
        BLOCK_H=block_h,
        BLOCK_D=next_power_of_2(head_dim),
        INTERLEAVED=interleaved,
        TWO_D=two_d,
    )  # fmt: skip
    return out
