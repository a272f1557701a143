"""Linear layers with narrow weights (half precision, int8) and activations in the activation dtype.

On this class of CPU (AVX2 + F16C, no AVX-512 FP16/BF16) a half-precision GEMV at batch 1 streams half the bytes of
an fp32 one and is memory-bound, so it is faster; a half-precision GEMM with many rows is compute-bound in a slow
kernel and much slower than fp32. ``HalfWeightLinear`` therefore keeps fp16 weights (half the memory) and picks the
path per call by the number of rows: fp16 GEMV for a few rows, upcast-then-fp32 GEMM otherwise. The threshold comes
from ``rtp-mm bench`` measurements (BENCHMARKS.md). The reference for both paths is ``F.linear`` in fp32.

``Int8WeightLinear`` (WEIGHT_TYPE=INT8) keeps symmetric per-output-channel int8 weights plus one float32 scale per
output channel: a quarter of the fp32 bytes. Microseconds per call, one thread, fp32 activations, on this 2-core AVX2
EPYC (shared and noisy; best of several rounds). Weights cycle through 128 MB of copies so they come from DRAM as in
a real decode step (with cache-hot weights fp32 wins the small shapes by ~2x instead):

    shape (in->out)   rows  fp32 F.linear  _weight_int8pack_mm  dequantize+F.linear  F.linear(q)*scale  chunked
    576->960 (qkv)       1      225              581                 270                 147            165
    576->576 (o)         1      161              357                 189                 122            122
    576->3072 (gate_up)  1      877             1845                1893                 743            583
    1536->576 (down)     1      345             1281                 545                 292            345
    576->49152 (head)    1    16141            31004              137905               31817           8509
    576->960            16      748            14768                 676                 508            454
    576->576            16      393             5609                 345                 277            285
    576->3072           16     2376            36752                3951                1945           1433
    1536->576           16      900            14825                 942                 698            694
    576->49152          16    50983           (>400000)           181672               65304          23294

("chunked" upcasts UPCAST_CHUNK_ELEMS at a time: one block for every shape but gate_up and the head.)
``torch._weight_int8pack_mm`` has no fast kernel for this CPU (2-30x slower than fp32), and upcasting a whole large
matrix costs a fresh multi-MB allocation per call. So on CPU with fp32 activations the int8 matrix is upcast without
its scale (exact: |q| <= 127), multiplied, and the output scaled per channel; a matrix over UPCAST_CHUNK_ELEMS is
upcast one block of output channels at a time into a cache-sized scratch buffer, which beats fp32 because it reads a
quarter of the bytes from DRAM. All 121 projections of SmolLM2-135M in a row (one decode step without attention):
fp32 56 ms -> int8 43 ms at 1 row, 150 -> 124 ms at 16 rows. With 2 threads on this oversubscribed machine every
op's timing is dominated by waiting for the second core; end to end the two are then level. Other devices/dtypes
(not measured: no GPU here) dequantize then call F.linear, which also keeps fp16 from overflowing on unscaled int8
sums. The reference is dequantize-then-F.linear in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.kernels.attention import quantize_int8

# Up to this many rows the fp16 GEMV path is used.
HALF_GEMV_MAX_ROWS = 4
# Narrow matrices (int8, or half precision at more than HALF_GEMV_MAX_ROWS rows) with more elements than this are
# upcast block by block (4 MB fp32 scratch, fits the L3 cache).
UPCAST_CHUNK_ELEMS = 1 << 20


def half_weight_linear(
    x: torch.Tensor,  # [rows, in] float32
    weight: torch.Tensor,  # [out, in] float16
    bias: torch.Tensor | None = None,  # [out] float32
) -> torch.Tensor:  # [rows, out] float32
    if x.shape[0] <= HALF_GEMV_MAX_ROWS:
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias
    if weight.numel() <= UPCAST_CHUNK_ELEMS or x.device.type != "cpu":
        return F.linear(x, weight.to(x.dtype), bias)
    # Upcasting a large matrix whole costs a fresh allocation per call (the 49152x576 LM head at 16 rows: ~135 ms
    # against ~25 ms chunked, one thread).
    out = _chunked_upcast_linear(x, weight)
    return out if bias is None else out + bias


class HalfWeightLinear(nn.Module):
    """Drop-in for nn.Linear holding its weight in float16 while inputs/outputs stay in the activation dtype."""

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(weight_dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.matmul = half_weight_linear  # the kernel backend's op (transforms.use_cpu_kernels swaps it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the decoder's flattened batch: no reshapes (a decode step runs ~120 of these)
            return self.matmul(x, self.weight, self.bias)
        shape = x.shape
        out = self.matmul(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)


def int8_weight_linear_reference(
    x: torch.Tensor,  # [rows, in]
    weight: torch.Tensor,  # [out, in] int8
    scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [rows, out] float32
    """The oracle: dequantize in fp32, then F.linear in fp32."""
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float() * scale.float()[:, None], bias)


def int8_weight_linear(
    x: torch.Tensor,  # [rows, in] activation dtype
    weight: torch.Tensor,  # [out, in] int8
    scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None = None,  # [out] activation dtype
) -> torch.Tensor:  # [rows, out] activation dtype
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)
    if weight.numel() <= UPCAST_CHUNK_ELEMS:
        out = F.linear(x, weight.to(x.dtype)) * scale
    else:
        out = _chunked_upcast_linear(x, weight, scale)
    return out if bias is None else out + bias


def _chunked_upcast_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale).T for a narrow (int8 or half) ``weight``, upcasting UPCAST_CHUNK_ELEMS of it at a time into
    one reused scratch buffer, so the matrix is streamed once and never materialised in the activation dtype."""
    out_features, in_features = weight.shape
    block_rows = max(1, UPCAST_CHUNK_ELEMS // in_features)
    scratch = torch.empty(min(block_rows, out_features), in_features, dtype=x.dtype)
    out_t = torch.empty(out_features, x.shape[0], dtype=x.dtype)  # [out, rows]: each block's rows are contiguous
    x_t = x.t()
    for start in range(0, out_features, block_rows):
        end = min(start + block_rows, out_features)
        block = scratch[: end - start].copy_(weight[start:end])
        torch.mm(block, x_t, out=out_t[start:end])
    if scale is not None:
        out_t.mul_(scale[:, None])
    return out_t.t().contiguous()


class Int8WeightLinear(nn.Module):
    """Drop-in for nn.Linear holding W as symmetric per-output-channel int8: ``weight`` [out, in] int8 and ``scale``
    [out] float32 with W ~= weight * scale[:, None], |error| <= scale / 2 per element (an all-zero row gets scale 0
    and stays exactly zero). Inputs, outputs and the bias stay in the activation dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.matmul = int8_weight_linear  # the kernel backend's op (the Triton one never materialises W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.matmul(x.reshape(-1, shape[-1]), self.weight, self.scale, self.bias)
        return out.view(*shape[:-1], self.out_features)


class Int8WeightEmbedding(nn.Module):
    """Drop-in for nn.Embedding stored like Int8WeightLinear (one int8 row and float32 scale per token), so a tied LM
    head can project with the same table through int8_weight_linear. A lookup dequantizes only the gathered rows and
    returns float32."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        weight, scale = quantize_int8(embedding.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden] int8
        self.scale = nn.Parameter(scale, requires_grad=False)  # [vocab] float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden] float32
        return self.weight[input_ids].to(torch.float32) * self.scale[input_ids].unsqueeze(-1)
