"""HalfWeightLinear (WEIGHT_TYPE=FP16/BF16 on CPU): every path against F.linear in fp32 over the rounded weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtp_mm.kernels import linear as linear_mod
from rtp_mm.kernels.linear import HALF_GEMV_MAX_ROWS, HalfWeightLinear


def _case(in_f: int, out_f: int, dtype: torch.dtype, seed: int) -> tuple[nn.Linear, HalfWeightLinear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=True)
    half = HalfWeightLinear(layer, dtype)
    return layer, half, half.weight.detach().float()  # the fp32 reference uses the rounded weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])
def test_every_row_count_matches_fp32_reference(monkeypatch, dtype, chunked):
    if chunked:  # 100 x 64 > 1000 elements: upcast 15 output rows at a time, with a partial last block
        monkeypatch.setattr(linear_mod, "UPCAST_CHUNK_ELEMS", 1000)
    layer, half, w_ref = _case(64, 100, dtype, seed=1)
    assert half.weight.dtype == dtype and half.bias.dtype == torch.float32
    for rows in (1, HALF_GEMV_MAX_ROWS, HALF_GEMV_MAX_ROWS + 1, 16):
        x = torch.randn(rows, 64)
        out = half(x)
        assert out.dtype == torch.float32 and out.shape == (rows, 100) and out.is_contiguous()
        expected = torch.nn.functional.linear(x, w_ref, layer.bias.detach())
        # GEMV rows round the activations to the half dtype as well: a few ulps of that dtype
        tol = 0 if rows > HALF_GEMV_MAX_ROWS else (2e-2 if dtype == torch.bfloat16 else 3e-3)
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item() + 1e-5)


def test_leading_dims():
    _, half, _ = _case(32, 24, torch.float16, seed=2)
    x = torch.randn(2, 2, 32)  # 4 rows: the GEMV path, like a single row
    assert half(x).shape == (2, 2, 24)
    torch.testing.assert_close(half(x)[1, 1], half(x[1, 1:2])[0])
