"""INT8 weight-only GEMM in Triton (WEIGHT_TYPE=INT8): ``x @ (w_int8 * scale[:, None]).T + bias``.

Each tile of int8 weights is converted to the dot's operand dtype in registers (exact: |w| <= 127 fits fp16 and bf16
mantissas) and the per-output-channel scale multiplies the fp32 accumulator once per output, so the dequantized
matrix never exists in memory: a decode step streams a quarter of the fp32 weight bytes (half of fp16's). Same
signature and result as ``linear.int8_weight_linear``; fp32 activations use exact fp32 ("ieee") dots.
"""

from __future__ import annotations

import torch

from rtp_mm.kernels.triton import dot_in_fp32, launcher, next_power_of_2

try:  # optional: the module imports without triton; launcher() raises a clear error then
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None

BLOCK_N = 64  # output channels per program
BLOCK_K = 64  # input features per step


def _int8_linear_kernel(
    X,  # [rows, in]
    W,  # [out, in] int8
    SCALE,  # [out] float32
    BIAS,  # [out] (HAS_BIAS only)
    Y,  # [rows, out]
    rows,
    out_features,
    in_features,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_mask = m < rows
    n_mask = n < out_features
    x_ptrs = X + m[:, None].to(tl.int64) * stride_xm + k[None, :]
    w_ptrs = W + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_mask = (k0 + k) < in_features
        x = tl.load(x_ptrs + k0, m_mask[:, None] & k_mask[None, :], 0.0)
        w = tl.load(w_ptrs + k0, n_mask[:, None] & k_mask[None, :], 0)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = acc * tl.load(SCALE + n, n_mask, 0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + n, n_mask, 0.0).to(tl.float32)[None, :]
    y_ptrs = Y + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), m_mask[:, None] & n_mask[None, :])


def int8_weight_linear(
    x: torch.Tensor,  # [rows, in] activation dtype
    weight: torch.Tensor,  # [out, in] int8
    scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None = None,  # [out] activation dtype
) -> torch.Tensor:  # [rows, out] activation dtype
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] != in_features:
        raise ValueError(f"weight must be int8 [out, {in_features}]; got {weight.dtype} {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    scale = scale.to(torch.float32)  # a no-op for Int8WeightLinear's float32 scales
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    # Decode has a few rows: a 16-row tile (tl.dot's minimum) wastes nothing of the weight stream, which dominates.
    block_m = min(64, next_power_of_2(rows, 16))
    kernel = launcher(_int8_linear_kernel, x.device)
    kernel[(-(-rows // block_m), -(-out_features // BLOCK_N))](
        x, weight, scale, scale if bias is None else bias, y,
        rows, out_features, in_features,
        x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        HAS_BIAS=bias is not None,
        DOT_F32=dot_in_fp32(x.device, x.dtype),
    )  # fmt: skip
    return y
