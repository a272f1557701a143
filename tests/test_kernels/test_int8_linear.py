"""Int8WeightLinear / Int8WeightEmbedding: symmetric per-output-channel int8 weights, activations unquantized.

The oracle is the fp32 layer whose weight is the dequantized int8 weight, computed here from the formula
scale = max|W[row]| / 127, q = round(W / scale) (a test-side re-implementation, not the kernel's own reference).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rtp_mm.kernels.linear as linear_mod
from rtp_mm.kernels.linear import (
    Int8WeightEmbedding,
    Int8WeightLinear,
    int8_weight_linear,
    int8_weight_linear_reference,
)


def _linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    """A linear layer whose rows span four orders of magnitude, so per-row scales matter."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 2, out_features)[torch.randperm(out_features)][:, None])
        if bias:
            layer.bias.normal_(0, 1)
    return layer


def _dequantized(weight: torch.Tensor) -> torch.Tensor:  # [out, in] float32 -> the int8 grid's float32 values
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(weight / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127)
    return q * scale


def _matmul_slack(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation error bound for x @ weight.T with K <= 256: a few ulps of sum|x||w|."""
    return 1e-5 * (x.abs() @ weight.abs().T) + 1e-6


def test_quantization_is_per_output_channel_symmetric():
    layer = _linear(96, 40, bias=False, seed=0)
    q8 = Int8WeightLinear(layer)
    w = layer.weight.detach()
    assert q8.weight.dtype == torch.int8 and q8.weight.shape == (40, 96)
    assert q8.scale.dtype == torch.float32 and q8.scale.shape == (40,)
    torch.testing.assert_close(q8.scale, w.abs().amax(dim=1) / 127)
    # every row's largest element lands on +-127; rounding moves each element by at most half a step
    assert torch.equal(q8.weight.abs().amax(dim=1), torch.full((40,), 127, dtype=torch.int8))
    err = (q8.weight.float() * q8.scale[:, None] - w).abs()
    assert (err <= q8.scale[:, None] / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(q8.weight.float() * q8.scale[:, None], _dequantized(w), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_dequantized_fp32_layer(rows: int, bias: bool):
    layer = _linear(256, 72, bias=bias, seed=rows)
    q8 = Int8WeightLinear(layer)
    x = torch.randn(rows, 256)
    w_deq = _dequantized(layer.weight.detach())
    expected = torch.nn.functional.linear(x, w_deq, None if layer.bias is None else layer.bias.detach())
    out = q8(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 72)
    assert ((out - expected).abs() <= _matmul_slack(x, w_deq)).all()
    ref = int8_weight_linear_reference(x, q8.weight, q8.scale, q8.bias)
    assert ((ref - expected).abs() <= _matmul_slack(x, w_deq)).all()


def test_error_against_the_original_fp32_layer_is_bounded_by_int8_rounding():
    """Each weight moves by <= scale/2, so |y_int8 - y_fp32| <= scale[out] / 2 * sum|x|; for Gaussian rows the error is
    ~uniform in +-scale/2 with scale ~ 2.9 sigma / 127, i.e. a relative RMS error of about 0.7%."""
    layer = _linear(256, 72, bias=True, seed=3)
    q8 = Int8WeightLinear(layer)
    x = torch.randn(16, 256)
    with torch.no_grad():
        exact = layer(x)
    out = q8(x)
    bound = q8.scale / 2 * x.abs().sum(dim=1, keepdim=True) + _matmul_slack(x, layer.weight.detach())
    assert ((out - exact).abs() <= bound).all()
    torch.manual_seed(4)
    gaussian = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        gaussian.weight.normal_()
        rel = (Int8WeightLinear(gaussian)(x) - gaussian(x)).norm() / gaussian(x).norm()
    assert 1e-3 < rel < 1e-2


def test_zero_rows_stay_exactly_zero():
    layer = _linear(64, 8, bias=True, seed=5)
    with torch.no_grad():
        layer.weight[[0, 5]] = 0.0
    q8 = Int8WeightLinear(layer)
    assert q8.scale[0] == 0 and q8.scale[5] == 0
    assert not q8.weight[[0, 5]].any()
    out = q8(torch.randn(4, 64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, [0, 5]], layer.bias.detach()[[0, 5]].expand(4, 2), rtol=0, atol=0)


def test_chunked_path_for_large_matrices(monkeypatch):
    """Matrices over UPCAST_CHUNK_ELEMS are upcast block by block (here 15 rows per block, a partial last block)."""
    monkeypatch.setattr(linear_mod, "UPCAST_CHUNK_ELEMS", 1000)
    layer = _linear(64, 100, bias=True, seed=6)
    q8 = Int8WeightLinear(layer)
    w_deq = _dequantized(layer.weight.detach())
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        out = q8(x)
        assert out.is_contiguous() and out.shape == (rows, 100)
        expected = torch.nn.functional.linear(x, w_deq, layer.bias.detach())
        assert ((out - expected).abs() <= _matmul_slack(x, w_deq)).all()


def test_leading_dims_and_half_activations():
    layer = _linear(32, 24, bias=True, seed=7)
    q8 = Int8WeightLinear(layer)
    x = torch.randn(2, 3, 32)
    assert q8(x).shape == (2, 3, 24)
    torch.testing.assert_close(q8(x)[1, 2], q8(x[1, 2:3])[0])
    # activation dtypes other than fp32 dequantize into that dtype first (bf16: ~3 significant digits)
    q8.bias.data = q8.bias.data.to(torch.bfloat16)
    out = int8_weight_linear(x[0].to(torch.bfloat16), q8.weight, q8.scale, q8.bias)
    assert out.dtype == torch.bfloat16
    ref = int8_weight_linear_reference(x[0], q8.weight, q8.scale, q8.bias)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_resident_bytes_are_a_quarter_of_fp32():
    layer = _linear(576, 960, bias=False, seed=8)
    q8 = Int8WeightLinear(layer)
    fp32_bytes = layer.weight.numel() * 4
    int8_bytes = sum(p.numel() * p.element_size() for p in q8.parameters())
    assert int8_bytes == 576 * 960 + 4 * 960
    assert int8_bytes < 0.26 * fp32_bytes


def test_embedding_lookup_dequantizes_rows():
    torch.manual_seed(9)
    table = nn.Embedding(50, 16)
    with torch.no_grad():
        table.weight[7] = 0.0
    emb = Int8WeightEmbedding(table)
    assert emb.weight.dtype == torch.int8 and emb.scale.shape == (50,)
    ids = torch.tensor([[3, 7, 49], [0, 3, 12]])
    out = emb(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16)
    torch.testing.assert_close(out, _dequantized(table.weight.detach())[ids], rtol=0, atol=0)
    assert not out[0, 1].any()
    # the same table is a tied LM head's int8 weight
    hidden = torch.randn(4, 16)
    logits = int8_weight_linear(hidden, emb.weight, emb.scale)
    w_deq = _dequantized(table.weight.detach())
    assert ((logits - hidden @ w_deq.T).abs() <= _matmul_slack(hidden, w_deq)).all()
