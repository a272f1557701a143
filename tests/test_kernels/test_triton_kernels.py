"""The Triton kernels of ``rtp_mm.kernels.triton`` against their pure-torch references: fused add + RMSNorm /
LayerNorm (``decoder.RMSNorm``, ``nn.LayerNorm``), rotary (``RotaryEmbedding.apply``) and the INT8 weight-only GEMM
(``linear.int8_weight_linear``); the attention kernels are in test_triton_attention.py.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported); the same cases
run compiled on CUDA under the ``gpu`` marker.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: CPU tensors can only run interpreted

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package (pip install triton)")

from rtp_mm.kernels.attention import quantize_int8  # noqa: E402
from rtp_mm.kernels.linear import int8_weight_linear as torch_int8_weight_linear  # noqa: E402
from rtp_mm.kernels.linear import int8_weight_linear_reference  # noqa: E402
from rtp_mm.kernels.triton import launcher, select_backend, triton_available  # noqa: E402
from rtp_mm.kernels.triton.add_norm import add_layer_norm, add_rms_norm  # noqa: E402
from rtp_mm.kernels.triton.int8_linear import int8_weight_linear  # noqa: E402
from rtp_mm.kernels.triton.rotary import _rotary_kernel, apply_rotary  # noqa: E402
from rtp_mm.llm.models.decoder import RMSNorm  # noqa: E402
from rtp_mm.llm.models.rope import RopeSpec, RotaryEmbedding  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_cpu_tensors_run_in_the_interpreter():
    """The interpreter really runs the CPU cases (a compiled kernel would be handed CPU pointers), and the serving
    backend on CPU stays the torch one."""
    from triton.runtime.interpreter import InterpretedFunction

    assert triton.knobs.runtime.interpret and triton_available()
    assert isinstance(launcher(_rotary_kernel, torch.device("cpu")), InterpretedFunction)
    assert select_backend("cpu") == "torch"
    assert select_backend("cuda") == ("triton" if torch.cuda.is_available() else "torch")


@CUDA
@pytest.mark.gpu
def test_cuda_tensors_run_compiled():
    from triton.runtime.jit import JITFunction

    assert type(launcher(_rotary_kernel, torch.device("cuda"))) is JITFunction


# (norm, leading shape, hidden, dtype, with residual): one row (decode), a hidden size that is not a power of two,
# a 3-D input, the first layer's call without a residual.
NORM_CASES = {
    "rms-decode": ("rms", (1,), 64, "fp32", True),
    "rms-odd-hidden": ("rms", (7,), 96, "fp32", True),
    "rms-3d-fp16": ("rms", (3, 5), 200, "fp16", True),
    "rms-bf16-first": ("rms", (9,), 128, "bf16", False),
    "layer-bias": ("layer", (6,), 80, "fp32", True),
    "layer-nobias-fp16": ("layer", (1,), 256, "fp16", True),
    "layer-bf16-first": ("layer", (2, 4), 72, "bf16", False),
}


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_add_norm_matches_reference(case, device):
    kind, lead, hidden, dtype_name, with_residual = NORM_CASES[case]
    dtype = HALF[dtype_name]
    g = torch.Generator().manual_seed(len(case))
    x = (3 * torch.randn(*lead, hidden, generator=g) + 0.5).to(device, dtype)
    residual = torch.randn(*lead, hidden, generator=g).to(device, dtype) if with_residual else None
    if kind == "rms":
        norm = RMSNorm(hidden, eps=1e-6)
    else:
        norm = nn.LayerNorm(hidden, eps=1e-5, bias=case == "layer-bias")
    with torch.no_grad():  # random affine parameters: the defaults (1 and 0) would hide a missing weight or bias
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    norm = norm.to(device, dtype)
    summed = x if residual is None else x + residual
    with torch.no_grad():
        expected = norm(summed)
    if kind == "rms":
        out, new_residual = add_rms_norm(x, residual, norm.weight, norm.eps)
    else:
        out, new_residual = add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    assert torch.equal(new_residual, summed)  # the residual stream is the plain sum, rounded to the dtype
    assert_close(out, expected, dtype)


# (RopeSpec, head_dim, heads, dtype, half-width tables): NeoX full and partial (GPT-NeoX rotary_pct), GPT-J
# interleaved, GLM2's interleaved half, GLM v1's 2D, a scaled rope, and the [tokens, 1, dim / 2] fp32 tables.
ROPE_CASES = {
    "neox": (RopeSpec(), 16, 3, "fp32", False),
    "neox-partial": (RopeSpec(dim=8), 32, 4, "fp32", False),
    "neox-partial-bf16": (RopeSpec(dim=16, theta=500000.0), 64, 5, "bf16", False),
    "gptj-interleaved": (RopeSpec(interleaved=True), 16, 2, "fp32", False),
    "glm2-interleaved-half": (RopeSpec(dim=16, interleaved=True), 32, 3, "fp16", False),
    "glm-2d": (RopeSpec(two_d=True), 32, 4, "fp32", False),
    "glm-2d-fp16": (RopeSpec(two_d=True, fp16_inv_freq=True), 16, 2, "fp16", False),
    "yarn": (RopeSpec(scaling="yarn", factor=4.0, original_max_position=64), 16, 2, "fp32", False),
    "half-width-tables": (RopeSpec(dim=12), 24, 3, "fp32", True),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_matches_reference(case, device):
    spec, head_dim, heads, dtype_name, half_width = ROPE_CASES[case]
    dtype = HALF[dtype_name]
    g = torch.Generator().manual_seed(len(case))
    tokens = 7
    rope = RotaryEmbedding(spec, head_dim)
    positions = torch.randint(0, 300, (tokens,), generator=g)
    if spec.two_d:  # (position, block position): context tokens then generated ones counting up
        positions = torch.stack((positions, torch.tensor([0, 0, 0, 1, 2, 3, 4])), dim=-1)
    positions = positions.to(device)
    if half_width:
        cos, sin = (t[:, None, :] for t in rope.cos_sin(positions))
    else:
        cos, sin = rope.cos_sin(positions, for_dtype=dtype)
    # q as the decoder has it: a view into the fused qkv projection's output (strided tokens).
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=g).to(device, dtype)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    expected = rope.apply(x, cos, sin)
    out = apply_rotary(x, cos, sin, rope.dim, spec.interleaved, spec.two_d)
    assert_close(out, expected, dtype)


# (rows, in, out, dtype, bias): a decode row, sizes that are no multiple of the tiles, more than one row tile.
INT8_CASES = {
    "decode": (1, 64, 96, "fp32", False),
    "odd-bias": (5, 100, 70, "fp32", True),
    "row-tiles": (70, 130, 200, "fp32", True),
    "fp16": (3, 64, 80, "fp16", True),
    "bf16": (17, 96, 64, "bf16", False),
}


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_int8_weight_linear_matches_reference(case, device):
    rows, in_features, out_features, dtype_name, with_bias = INT8_CASES[case]
    dtype = HALF[dtype_name]
    g = torch.Generator().manual_seed(len(case))
    weight, scale = quantize_int8(torch.randn(out_features, in_features, generator=g) / in_features**0.5)
    weight[3] = 0  # an all-zero row: scale 0, output exactly the bias
    scale[3] = 0.0
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    bias = torch.randn(out_features, generator=g).to(device, dtype) if with_bias else None
    weight, scale = weight.to(device), scale.to(device)
    out = int8_weight_linear(x, weight, scale, bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    expected = int8_weight_linear_reference(x, weight, scale, bias)  # fp32 dequantize-then-F.linear
    assert_close(out.float(), expected, dtype)
    if dtype == torch.float32:  # and the op it replaces
        assert_close(out, torch_int8_weight_linear(x, weight, scale, bias), dtype)
