"""The CPU kernel backend (rtp_mm/kernels/cpu): each C++ op against an independent float64 torch computation, and
the whole backend swapped into tiny models against the torch reference ops (greedy tokens and logprobs).

These machines are x86-64 with AVX2, so the kernels must build here: a failed build fails these tests instead of
silently leaving the torch ops in place. Paged decode attention is also run through the mixed-batch cases of
test_paged_attention.py (GQA/MQA, ALiBi, garbage caches, shuffled block tables)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rtp_mm import GenerateConfig
from rtp_mm.kernels import attention, cpu, linear
from rtp_mm.kernels.attention import AttnMetadata, KVCache, quantize_int8
from rtp_mm.llm.models.cpu_layers import CpuDecodeStack
from rtp_mm.llm.models.rope import RopeSpec, RotaryEmbedding
from rtp_mm_testing.oracle import random_prompts, tiny_llm
from rtp_mm_testing.tp_cases import CASES


def test_kernels_build_on_this_machine():
    assert cpu.unavailable_reason() is None
    assert hasattr(cpu.ops(), "decode_layers")


def test_a_cpu_without_avx2_keeps_the_torch_ops(monkeypatch):
    from rtp_mm.llm.models.transforms import use_cpu_kernels

    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"fma", "f16c"})
    cpu._load.cache_clear()
    try:
        assert cpu.unavailable_reason() == "this CPU lacks avx2"
        with pytest.raises(RuntimeError, match="CPU kernels unavailable: this CPU lacks avx2"):
            cpu.ops()
        assert use_cpu_kernels(None) == "torch ops (CPU kernels unavailable: this CPU lacks avx2)"
    finally:
        cpu._load.cache_clear()


def _f64_linear(x, w, scale=None, bias=None):
    out = x.double() @ w.double().T
    out = out if scale is None else out * scale.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("shape", [(7, 40), (96, 100), (960, 576)], ids=str)  # in: tail < 8, tail 4, 18 x 32
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_weight_only_linears(rows, shape, with_bias):
    out_features, in_features = shape
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    q, scale = quantize_int8(weight)
    half = weight.half()
    got_int8 = cpu.int8_weight_linear(x, q, scale, bias)
    got_half = cpu.half_weight_linear(x, half, bias)
    tol = 1e-5 * math.sqrt(in_features) * 4  # fp32 sums of N products of ~unit size against float64
    torch.testing.assert_close(got_int8.double(), _f64_linear(x, q, scale, bias), rtol=1e-5, atol=tol)
    torch.testing.assert_close(got_half.double(), _f64_linear(x, half, None, bias), rtol=1e-5, atol=tol)


def test_linears_hand_more_rows_and_other_dtypes_to_the_reference():
    x = torch.randn(cpu.KERNEL_MAX_ROWS + 1, 16)
    q, scale = quantize_int8(torch.randn(8, 16))
    assert torch.equal(cpu.int8_weight_linear(x, q, scale), linear.int8_weight_linear(x, q, scale))
    bf16 = torch.randn(8, 16).bfloat16()
    assert torch.equal(cpu.half_weight_linear(x[:1], bf16), linear.half_weight_linear(x[:1], bf16))


@pytest.mark.parametrize("shape", [(1, 576), (5, 100), (3, 7)], ids=str)
def test_rms_norm_and_silu_mul(shape):
    g = torch.Generator().manual_seed(shape[1])
    x, weight = torch.randn(*shape, generator=g) * 3, torch.randn(shape[1], generator=g)
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-6).double(), expected, rtol=1e-5, atol=1e-5)
    gate, up = x64.chunk(2, dim=-1) if shape[1] % 2 == 0 else (x64, x64)
    h = torch.cat([gate, up], dim=-1).float()
    torch.testing.assert_close(cpu.silu_mul(h).double(), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 10, 6])
def test_rotary_on_the_fused_qkv_view(head_dim):
    rotary = RotaryEmbedding(RopeSpec(), head_dim)
    heads, kv_heads, tokens = 3, 1, 5
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g)
    qk = qkv[:, : heads + kv_heads]  # a strided view, as Attention.forward passes it
    positions = torch.tensor([0, 1, 7, 100, 2047])
    cos, sin = rotary.cos_sin(positions, None, for_dtype=torch.float32)
    expected = rotary.apply(qk.clone(), cos, sin)
    v_before = qkv[:, heads + kv_heads :].clone()
    got = cpu.rotary_neox(qk, cos, sin)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, : heads + kv_heads], expected)  # in place
    assert torch.equal(qkv[:, heads + kv_heads :], v_before)  # values untouched


@pytest.mark.parametrize("first_key", [0, 3, 6])
def test_decode_attention_first_key_and_block_tables(first_key):
    """Decodes of three sequences (context 7, 13 and 9 over 4-token blocks in shuffled order) against the torch
    reference op, with the P-tuning pad [0, first_key) hidden."""
    bs, heads, kv_heads, dim = 4, 6, 2, 16
    g = torch.Generator().manual_seed(first_key)
    cache = KVCache(*(torch.randn(12, bs, kv_heads, dim, generator=g) for _ in range(2)))
    tables = torch.tensor([[5, 2, 0, 0], [7, 1, 3, 9], [11, 4, 8, 0]])
    lens = torch.tensor([7, 13, 9])
    slots = torch.stack([tables[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens.tolist())])
    meta = AttnMetadata(slots, 3, tables, lens, 13, None, (), bs, first_key)
    q, k, v = (torch.randn(3, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    reference_cache = KVCache(cache.k.clone(), cache.v.clone())
    expected = attention.paged_attention(q, k, v, reference_cache, meta, 0.25)
    got = cpu.paged_attention(q, k, v, cache, meta, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.k, reference_cache.k) and torch.equal(cache.v, reference_cache.v)  # same writes


GREEDY = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=3)


def _generate(monkeypatch, kernels: bool, path, model_type, prompts, **kw):
    if not kernels:
        monkeypatch.setattr(cpu, "_load", lambda: (None, "turned off by the test"))
    try:
        with tiny_llm(path, model_type, **kw) as llm:
            return llm.weight_path, llm.generate(prompts, GREEDY)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize(
    "case,weight_type",
    [("llama_gqa", "INT8"), ("llama_gqa", "FP16"), ("llama_gqa", "FP32"), ("qwen_2_bias_untied_head", "INT8")],
)
def test_backend_keeps_greedy_output_and_logprobs(tmp_path, monkeypatch, case, weight_type):
    """Three prompts decoded together (rows 1-3 through the whole-stack op), the longest split into chunks by a
    16-token step budget (mixed steps run the modules with the single kernels)."""
    build, model_type, vocab = CASES[case]
    path = build(tmp_path / case)
    prompts = random_prompts(vocab, [5, 21, 9], seed=3)
    calls = []
    stack_call = CpuDecodeStack.__call__

    def counted(self, *args):
        out = stack_call(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(CpuDecodeStack, "__call__", counted)
    kw = dict(weight_type=weight_type, max_num_batched_tokens=16)
    fast_path, fast = _generate(monkeypatch, True, path, model_type, prompts, **kw)
    ref_path, reference = _generate(monkeypatch, False, path, model_type, prompts, **kw)
    assert "cpu kernels" in fast_path and "turned off by the test" in ref_path
    assert ("no whole-stack decode" not in fast_path) == (weight_type != "FP32")  # fp32 keeps oneDNN packing
    if weight_type != "FP32":
        assert sum(calls) >= 8 and not all(calls)  # decode steps took the stack, mixed steps did not
    # The fp16 reference rounds each projection's input to fp16 (torch's half GEMV); the kernel keeps it in fp32.
    tol = 2e-3 if weight_type == "FP16" else 1e-4
    for ref, out in zip(reference, fast, strict=True):
        assert out.token_ids == ref.token_ids
        for a, b in zip(ref.logprobs, out.logprobs, strict=True):
            for token, lp in a.items():
                assert abs(b[token] - lp) < tol


def test_stack_refuses_other_shapes_and_steps_aside_for_wrapped_projections(tmp_path):
    build, model_type, _ = CASES["bloom_alibi"]
    with tiny_llm(build(tmp_path / "bloom"), model_type, weight_type="INT8") as llm:
        assert "no whole-stack decode: not a pre-RMSNorm residual block" in llm.weight_path
    build, model_type, vocab = CASES["llama_gqa"]
    with tiny_llm(build(tmp_path / "llama"), model_type, weight_type="INT8") as llm:
        model = llm.client.call(lambda engine: engine.runner.model)
        stack = model.layer_stack
        assert isinstance(stack, CpuDecodeStack)
        before = llm.generate([[5, 6, 7]], GREEDY)[0]
        layer = model.layers[1]
        original = layer.mlp.down
        layer.mlp.down = torch.nn.Sequential(original)  # what a LoRA wrapper does to the module tree
        try:
            h = torch.randn(1, model.spec.hidden_size)
            meta = AttnMetadata(torch.tensor([0]), 1, torch.tensor([[0]]), torch.tensor([1]), 1, None, (), 16)
            cos, sin = model.rotary.cos_sin(torch.tensor([0]), None, for_dtype=torch.float32)
            from rtp_mm.llm.models.decoder import StepContext

            assert stack(h, StepContext(meta, cos, sin), llm.client.call(lambda e: e.runner.caches)) is None
            assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == before.token_ids  # the modules ran instead
        finally:
            layer.mlp.down = original
