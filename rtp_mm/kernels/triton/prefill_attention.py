"""Prefill / chunked-prefill attention in Triton: one chunk of q_len queries at positions start_pos.. of a sequence.

Same results as the reference's per-chunk path in ``attention.paged_attention``: causal, plus GLM's bidirectional
prefix (keys < ``bidirectional_len`` visible to every query), minus the P-tuning pad (keys < ``first_key``), plus
ALiBi. Like the reference, a chunk starting at position 0 attends to its own K/V as computed (for an int8 cache:
unquantized), and a later chunk reads all of its keys (the cached prefix and its own) through the block table. One
program per (tile of BLOCK_M queries, head) with an online softmax over key tiles; a tile stops at the last key any
of its queries can see (its last position, or the bidirectional prefix when that is longer).
"""

from __future__ import annotations

import torch

from rtp_mm.kernels.attention import Int8KVCache, KVCache, PrefillChunk
from rtp_mm.kernels.triton import dot_in_fp32, launcher, next_power_of_2
from rtp_mm.kernels.triton.decode_attention import queries_in_key_basis

try:  # optional: the module imports without triton; launcher() raises a clear error then
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None


def _prefill_attention_kernel(
    Q,  # [q_len, H, D]
    K,  # PAGED: [num_blocks, block_size, KVH, D] (int8 with INT8); else the chunk's own [q_len, KVH, D]
    V,  # same layout and strides as K
    K_SCALE,  # [num_blocks, block_size, KVH] float32 (INT8 only)
    V_SCALE,
    BLOCK_TABLE,  # [num_blocks] int64 (PAGED only)
    SLOPES,  # [H] float32 (ALIBI only)
    OUT,  # [q_len, H, D]
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_sb,
    stride_st,
    stride_ot,
    stride_oh,
    scale,
    q_len,
    start_pos,
    bidirectional_len,
    first_key,
    block_size,
    head_dim,
    group,  # query heads per kv head
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGED: tl.constexpr,
    INT8: tl.constexpr,
    ALIBI: tl.constexpr,
    DOT_F32: tl.constexpr,  # fp32 operands (fp32 or int8 cache): exact "ieee" dots, not tf32
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    row_mask = rows < q_len
    d_mask = d < head_dim
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :], row_mask[:, None] & d_mask[None, :], 0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = start_pos + rows
    total = start_pos + q_len
    qk_scale = scale * 1.4426950408889634  # softmax in base 2: log2(e) folded into the scale and the slope
    if ALIBI:
        slope = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: an all-masked tile row rescales by 1, never nan
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    last = tl.minimum(tl.maximum(start_pos + (tile + 1) * BLOCK_M, bidirectional_len), total)
    for start in range(first_key // BLOCK_N * BLOCK_N, last, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_seq = pos < total
        valid = in_seq & (pos >= first_key)
        if PAGED:
            block = tl.load(BLOCK_TABLE + pos // block_size, in_seq, 0)
            kv_rows = block * stride_kb + (pos % block_size) * stride_kt
        else:  # the chunk's own K/V, which start at position 0
            kv_rows = pos.to(tl.int64) * stride_kt
        kv_ptrs = kv_rows[:, None] + kv_head * stride_kh + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(K + kv_ptrs, kv_mask, 0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        if INT8:  # dequantize in fp32: (q . k_int8) * k_scale == q . (k_int8 * k_scale)
            s = s * tl.load(K_SCALE + block * stride_sb + (pos % block_size) * stride_st + kv_head, valid, 0.0)[None, :]
        s = s * qk_scale
        if ALIBI:
            s += slope * (pos[None, :] - q_pos[:, None]).to(tl.float32)
        visible = (pos[None, :] <= q_pos[:, None]) | (pos[None, :] < bidirectional_len)
        s = tl.where(visible & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_ptrs, kv_mask, 0)
        if INT8:
            p = p * tl.load(V_SCALE + block * stride_sb + (pos % block_size) * stride_st + kv_head, valid, 0.0)[None, :]
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    out_ptrs = OUT + rows[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), row_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]: the chunk's queries
    k: torch.Tensor,  # [q_len, num_kv_heads, head_dim]: the chunk's own keys, already written to the cache
    v: torch.Tensor,  # [q_len, num_kv_heads, head_dim]
    cache: KVCache | Int8KVCache,
    chunk: PrefillChunk,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads]
    first_key: int = 0,  # AttnMetadata.first_key
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    """One chunk of ``attention.paged_attention``'s prefill loop. ``chunk.mask`` is not read: the engine builds it
    with ``attention.causal_mask`` from the same start_pos, q_len, bidirectional_len and first_key the kernel uses."""
    q_len, heads, head_dim = q.shape
    dtype = q.dtype
    paged = chunk.start_pos > 0
    int8 = paged and isinstance(cache, Int8KVCache)
    if paged:
        k, v = (cache.k_q, cache.v_q) if int8 else (cache.k, cache.v)
        block_size, kv_heads = k.shape[1], k.shape[2]
        if int8:
            q = queries_in_key_basis(q, cache)
    else:
        if k.stride() != v.stride():  # one set of strides for both (true of views of one fused qkv projection)
            k, v = k.contiguous(), v.contiguous()
        block_size, kv_heads = 1, k.shape[1]
    k_scale, v_scale = (cache.k_scale, cache.v_scale) if int8 else (k, v)  # unused pointers without INT8
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if q.stride(2) != 1 or k.stride(-1) != 1 or k.stride() != v.stride():
        raise ValueError("q, K and V need a contiguous head_dim axis and K/V one layout")
    out = torch.empty(q_len, heads, head_dim, dtype=dtype, device=q.device)
    slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous() if alibi_slopes is not None else q
    stride_kb = k.stride(0) if paged else 0
    stride_kt, stride_kh = (k.stride(1), k.stride(2)) if paged else (k.stride(0), k.stride(1))
    block_m = min(64, next_power_of_2(q_len, 16))
    kernel = launcher(_prefill_attention_kernel, q.device)
    kernel[(-(-q_len // block_m), heads)](
        q, k, v, k_scale, v_scale, chunk.block_table, slopes, out,
        q.stride(0), q.stride(1),
        stride_kb, stride_kt, stride_kh,
        k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1),
        scale, q_len, chunk.start_pos, chunk.bidirectional_len, first_key, block_size, head_dim, heads // kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=32,
        D_PAD=next_power_of_2(head_dim, 16),
        PAGED=paged,
        INT8=int8,
        ALIBI=alibi_slopes is not None,
        DOT_F32=int8 or dot_in_fp32(q.device, dtype, k.dtype),
    )  # fmt: skip
    return out
