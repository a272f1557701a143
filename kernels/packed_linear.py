"""fp32 linear layers on CPU through oneDNN with pre-packed weights.

PyTorch's default CPU GEMM (MKL here) is fast for a single row (a memory-bound GEMV) but slow on this class of CPU
(AMD EPYC, AVX2) for a few to a few hundred rows: batched decode and chunked prefill. oneDNN's inner-product with a
weight reordered once into its blocked layout was 2-5x faster for 16-64 rows in our measurements (BENCHMARKS.md),
and comparable for one row. ``PackedLinear`` keeps only the packed weight and uses oneDNN for every call with more
than ``GEMV_MAX_ROWS`` rows; the single-row path goes through the same packed weight when
``PACKED_SINGLE_ROW`` is on, or a plain copy otherwise. The reference is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows up to which the plain (MKL) GEMV is used when a plain copy is kept.
GEMV_MAX_ROWS = 1
# The batch-size hint oneDNN packs the weight for (its layout is good across 4-256 rows).
PACK_BATCH_HINT = 16


def onednn_available() -> bool:
    """True where torch was built with oneDNN and runs on x86 (the packed ops exist and are fast)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """Drop-in for an fp32 nn.Linear on CPU. ``keep_plain`` keeps the original weight too (2x memory) for the
    single-row GEMV path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_plain: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self.plain = weight if keep_plain else None
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_plain: bool = True) -> PackedLinear:
        return cls(linear.weight, linear.bias, keep_plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.plain is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            out = F.linear(x2, self.plain, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)
