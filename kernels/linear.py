"""Linear layers with half-precision weights on CPU.

On this class of CPU (AVX2 + F16C, no AVX-512 FP16/BF16) a half-precision GEMV at batch 1 streams half the bytes of
an fp32 one and is memory-bound, so it is faster; a half-precision GEMM with many rows is compute-bound in a slow
kernel and much slower than fp32. ``HalfWeightLinear`` therefore keeps fp16 weights (half the memory) and picks the
path per call by the number of rows: fp16 GEMV for a few rows, upcast-then-fp32 GEMM otherwise. The threshold comes
from ``rtp-mm bench`` measurements (BENCHMARKS.md). The reference for both paths is ``F.linear`` in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the fp16 GEMV path is used.
HALF_GEMV_MAX_ROWS = 4


def half_weight_linear(
    x: torch.Tensor,  # [rows, in] float32
    weight: torch.Tensor,  # [out, in] float16
    bias: torch.Tensor | None = None,  # [out] float32
) -> torch.Tensor:  # [rows, out] float32
    if x.shape[0] <= HALF_GEMV_MAX_ROWS:
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias
    return F.linear(x, weight.to(x.dtype), bias)


class HalfWeightLinear(nn.Module):
    """Drop-in for nn.Linear holding its weight in float16 while inputs/outputs stay in the activation dtype."""

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(weight_dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = half_weight_linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)
