"""Int8KVCache: per-(token, kv-head) symmetric int8 quantization (keys in a Hadamard-rotated basis), paged
write/gather, attention through it."""

from __future__ import annotations

import math

import pytest
import torch

from rtp_mm.kernels.attention import (
    AttnMetadata,
    Int8KVCache,
    KVCache,
    PrefillChunk,
    dequantize_int8,
    key_rotation,
    paged_attention,
    quantize_int8,
)

BLOCK_SIZE, NUM_BLOCKS, HEADS, KV_HEADS, HEAD_DIM = 4, 8, 4, 2, 16


def _random_kv(tokens: int, seed: int) -> torch.Tensor:
    """[tokens, KV_HEADS, HEAD_DIM] with magnitudes spread over several orders per (token, head)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g)
    return x * torch.logspace(-3, 2, tokens * KV_HEADS).view(tokens, KV_HEADS, 1)


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix / sqrt(n), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / math.sqrt(n)


def _slots(block_table: list[int], positions: range) -> list[int]:
    return [block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def test_round_trip_error_within_half_scale():
    x = _random_kv(24, seed=0)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale, x.abs().amax(dim=-1) / 127)
    # the largest element of every (token, head) lands on +-127
    assert torch.equal(q.abs().amax(dim=-1), torch.full(scale.shape, 127, dtype=torch.int8))
    err = (dequantize_int8(q, scale, torch.float32) - x).abs()
    assert (err <= scale[..., None] * (0.5 + 1e-5)).all()


def test_zero_vectors_give_exact_zeros():
    x = _random_kv(6, seed=1)
    x[2] = 0  # a whole token
    x[4, 1] = 0  # one head of a token
    cache = Int8KVCache.empty(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    table = [3, 6]
    cache.write(x, -x, torch.tensor(_slots(table, range(6))))
    k, v = cache.gather(torch.tensor(table), torch.float32)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert torch.equal(k[2], torch.zeros_like(k[2])) and torch.equal(v[4, 1], torch.zeros_like(v[4, 1]))
    assert cache.k_scale[3, 2].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_then_gather_through_block_tables(dtype):
    tables = [[5, 0, 2], [7, 1, 4]]  # non-contiguous, out of order
    ks, vs = [_random_kv(10, seed=2), _random_kv(9, seed=3)], [_random_kv(10, seed=4), _random_kv(9, seed=5)]
    fp = KVCache(*(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)))
    int8 = Int8KVCache.empty(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    for table, k, v in zip(tables, ks, vs, strict=True):
        slots = torch.tensor(_slots(table, range(k.shape[0])))
        fp.write(k, v, slots)
        int8.write(k, v, slots)
    block_tables = torch.tensor(tables)
    k_ref, v_ref = fp.gather(block_tables, dtype)
    k_out, v_out = int8.gather(block_tables, dtype)
    assert k_out.shape == k_ref.shape == (2, 3 * BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    assert k_out.dtype == v_out.dtype == dtype
    rot = _hadamard(HEAD_DIM)
    for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
        n = k.shape[0]
        # keys are quantized as k @ rot: the int8 step bounds the error in that basis
        for got, want, basis in ((k_out[i, :n], k, rot), (v_out[i, :n], v, torch.eye(HEAD_DIM))):
            want = want @ basis
            half_scale = want.abs().amax(dim=-1, keepdim=True) / 254
            # the half-precision cast of the result adds its own rounding on top of the int8 step (rotated: at most
            # its L2 norm, the basis being orthonormal)
            slack = 0 if dtype == torch.float32 else want.norm(dim=-1, keepdim=True) * torch.finfo(dtype).eps
            assert ((got.float() @ basis - want).abs() <= half_scale * (1 + 1e-4) + slack).all()


def _attention_oracle(q, k, v, start_pos, scale):
    """Naive causal GQA attention: q [T, H, D] at positions start_pos.., k/v [L, KVH, D] for positions 0.."""
    rep = HEADS // KV_HEADS
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * scale
    q_pos = torch.arange(start_pos, start_pos + q.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


def test_attention_through_int8_cache():
    """One decode (6 cached tokens + 1 new) and one prefill chunk (5 cached + 4 new) in the same batch."""
    g = torch.Generator().manual_seed(6)
    table_a, table_b = [2, 5], [7, 1, 3]
    hist_a, hist_b, chunk_b = 6, 5, 4
    k_all = [torch.randn(hist_a + 1, KV_HEADS, HEAD_DIM, generator=g), torch.randn(9, KV_HEADS, HEAD_DIM, generator=g)]
    v_all = [torch.randn(hist_a + 1, KV_HEADS, HEAD_DIM, generator=g), torch.randn(9, KV_HEADS, HEAD_DIM, generator=g)]
    q = torch.randn(1 + chunk_b, HEADS, HEAD_DIM, generator=g)
    scale = HEAD_DIM**-0.5
    meta = AttnMetadata(
        slot_mapping=torch.tensor(_slots(table_a, range(hist_a, hist_a + 1)) + _slots(table_b, range(5, 9))),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([table_a]),
        decode_context_lens=torch.tensor([hist_a + 1]),
        decode_max_context=hist_a + 1,
        decode_mask=None,
        prefills=(PrefillChunk(q_start=1, q_len=chunk_b, start_pos=hist_b, block_table=torch.tensor(table_b)),),
        block_size=BLOCK_SIZE,
    )
    new_k = torch.cat([k_all[0][hist_a:], k_all[1][hist_b:]])
    new_v = torch.cat([v_all[0][hist_a:], v_all[1][hist_b:]])

    outs = {}
    for name, cache in (
        ("fp32", KVCache(*(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)))),
        ("int8", Int8KVCache.empty(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)),
    ):
        # the history of both sequences, as earlier steps would have written it
        cache.write(k_all[0][:hist_a], v_all[0][:hist_a], torch.tensor(_slots(table_a, range(hist_a))))
        cache.write(k_all[1][:hist_b], v_all[1][:hist_b], torch.tensor(_slots(table_b, range(hist_b))))
        outs[name] = paged_attention(q, new_k, new_v, cache, meta, scale)

    def rounded(x, rot=torch.eye(HEAD_DIM)):
        return dequantize_int8(*quantize_int8(x @ rot), torch.float32) @ rot.T

    rot = _hadamard(HEAD_DIM)

    exact = torch.cat(
        [
            _attention_oracle(q[:1], k_all[0], v_all[0], hist_a, scale),
            _attention_oracle(q[1:], k_all[1], v_all[1], hist_b, scale),
        ]
    )
    # every K/V this batch reads goes through the int8 cache (decode and a chunk with a cached prefix)
    quantized = torch.cat(
        [
            _attention_oracle(q[:1], rounded(k_all[0], rot), rounded(v_all[0]), hist_a, scale),
            _attention_oracle(q[1:], rounded(k_all[1], rot), rounded(v_all[1]), hist_b, scale),
        ]
    )
    torch.testing.assert_close(outs["fp32"], exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["int8"], quantized, atol=1e-5, rtol=1e-5)
    err = (outs["int8"] - exact).abs().max().item()
    assert 0 < err < 0.03, err  # int8 really was used, and costs little


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96])
def test_key_rotation_is_orthonormal(head_dim):
    rot = key_rotation(head_dim).double()
    torch.testing.assert_close(rot @ rot.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-6, rtol=0)
    if head_dim & (head_dim - 1) == 0:
        torch.testing.assert_close(rot.float(), _hadamard(head_dim))


def test_rotation_shrinks_the_error_of_keys_with_outlier_channels():
    """Post-RoPE keys have a few channels far above the rest; in the rotated basis they share the int8 range."""
    g = torch.Generator().manual_seed(7)
    head_dim = 64
    k = torch.randn(32, KV_HEADS, head_dim, generator=g)
    k[..., [3, 35]] *= 8  # one RoPE pair (neox halves) carrying most of the magnitude
    cache = Int8KVCache.empty(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim)
    cache.write(k, k, torch.arange(32))
    k_out, v_out = cache.gather(torch.arange(NUM_BLOCKS), torch.float32)
    rotated_err, plain_err = (k_out[:32] - k).norm(), (v_out[:32] - k).norm()  # values are stored unrotated
    assert plain_err > 0 and rotated_err < 0.6 * plain_err, (rotated_err, plain_err)
