"""fp32 linear layers on CPU through oneDNN with pre-packed weights.

PyTorch's default CPU GEMM (MKL here) is slow on this class of CPU (AMD EPYC, AVX2) for a few to a few hundred rows,
and slower than oneDNN even for one row once the weights come from DRAM. Measured per call with the weights cycled
through 256 MiB so each call streams them from memory, as in a decode step (ms; plain F.linear / oneDNN packed):

    shape (out x in)   1 row          4 rows         16 rows
    960 x 576          0.35 / 0.27    0.53 / 0.29    0.61 / 0.43
    3072 x 576         1.10 / 0.62    2.24 / 0.85    1.97 / 1.16
    576 x 1536         0.46 / 0.42    0.85 / 0.48    0.77 / 0.65
    49152 x 576       16.9 / 10.3    38.1 / 11.2    44.2 / 15.9

So ``PackedLinear`` keeps only the weight reordered once (``_reorder_linear_weight``) into oneDNN's blocked layout and
runs every call through ``_linear_pointwise``. The reference is ``F.linear``; results differ by fp32 rounding only.
"""

from __future__ import annotations

import torch
from torch import nn

# The batch-size hint oneDNN packs the weight for (its layout measured well from 1 to 64 rows).
PACK_BATCH_HINT = 16


def onednn_available() -> bool:
    """True where torch was built with oneDNN (x86 CPU builds): the packed linear ops exist."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """Drop-in for an fp32 nn.Linear on CPU holding its weight in oneDNN's packed layout (same memory as fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def extra_weight_bytes(self) -> int:
        """Weight bytes held outside parameters (the packed copy)."""
        return self.packed.numel() * self.packed.element_size() + (0 if self.bias is None else self.bias.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous():  # the decoder's flattened batch: no reshapes
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)
