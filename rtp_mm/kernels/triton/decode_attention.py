"""Paged-KV decode attention in Triton: one query token per sequence over its cached context.

Same contract as ``attention._decode_attention``: queries [num_decodes, heads, head_dim], the layer's ``KVCache``
(fp32/fp16/bf16) or ``Int8KVCache`` (int8 values, a float32 scale per (token, kv-head), keys stored rotated), block
tables [num_decodes, max_blocks] int64, context lengths including the new token, optional ALiBi slopes, and the
P-tuning pad ``first_key`` below which no key exists. One program per (sequence, kv head) walks the context a tile
of BLOCK_N tokens at a time (online softmax), mapping each token to its block through the block table, so the block
size need not be a power of two and no padded context is gathered. The program holds every query head of its GQA
group (padded to 16 rows for tl.dot), so each K/V tile is read once per group instead of once per head.
"""

from __future__ import annotations

import torch

from rtp_mm.kernels.attention import AttnMetadata, Int8KVCache, KVCache
from rtp_mm.kernels.triton import dot_in_fp32, launcher, next_power_of_2

try:  # optional: the module imports without triton; launcher() raises a clear error then
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None

BLOCK_N = 16  # context tokens per tile: small contexts are common in decode, and 16 is tl.dot's minimum


def _decode_attention_kernel(
    Q,  # [B, H, D]
    K,  # [num_blocks, block_size, KVH, D] (int8 with INT8)
    V,
    K_SCALE,  # [num_blocks, block_size, KVH] float32 (INT8 only; any pointer otherwise)
    V_SCALE,
    BLOCK_TABLES,  # [B, max_blocks] int64
    CONTEXT_LENS,  # [B] int64
    SLOPES,  # [H] float32 (ALIBI only)
    OUT,  # [B, H, D]
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_sb,
    stride_st,
    stride_bt,
    stride_ob,
    stride_oh,
    scale,
    first_key,
    block_size,
    head_dim,
    group,  # query heads per kv head
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INT8: tl.constexpr,
    ALIBI: tl.constexpr,
    DOT_F32: tl.constexpr,  # fp32 operands (fp32 or int8 cache): exact "ieee" dots, not tf32
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kv_head * group + g
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], g_mask[:, None] & d_mask[None, :], 0.0)
    context = tl.load(CONTEXT_LENS + seq).to(tl.int32)
    # Softmax in base 2 (exp2 is the hardware's): fold log2(e) into the logit scale and the ALiBi slope.
    qk_scale = scale * 1.4426950408889634
    if ALIBI:
        slope = tl.load(SLOPES + heads, g_mask, 0.0).to(tl.float32) * 1.4426950408889634
    # A finite floor instead of -inf: a tile whose keys are all masked for a row then gives exp2(-inf) = 0 weights
    # and a rescale of exactly 1, never inf - inf = nan.
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if DOT_F32:
        q = q.to(tl.float32)
    for start in range(first_key // BLOCK_N * BLOCK_N, context, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_context = pos < context
        valid = in_context & (pos >= first_key)
        block = tl.load(BLOCK_TABLES + seq * stride_bt + pos // block_size, in_context, 0)
        offset = pos % block_size
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            K + block[:, None] * stride_kb + offset[:, None] * stride_kt + kv_head * stride_kh + d[None, :], kv_mask, 0
        )
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        if INT8:  # dequantize in fp32: (q . k_int8) * k_scale == q . (k_int8 * k_scale)
            k_scale = tl.load(K_SCALE + block * stride_sb + offset * stride_st + kv_head, valid, 0.0)
            s = s * k_scale[None, :]
        s = s * qk_scale
        if ALIBI:  # slope * (key position - query position); the query sits at context - 1
            s += slope[:, None] * (pos - (context - 1)).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + block[:, None] * stride_vb + offset[:, None] * stride_vt + kv_head * stride_vh + d[None, :], kv_mask, 0
        )
        if INT8:
            v_scale = tl.load(V_SCALE + block * stride_sb + offset * stride_st + kv_head, valid, 0.0)
            p = p * v_scale[None, :]
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    out_ptrs = OUT + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), g_mask[:, None] & d_mask[None, :])


def queries_in_key_basis(q: torch.Tensor, cache: Int8KVCache) -> torch.Tensor:
    """Queries in the basis the int8 keys are stored in: q . (k_rot @ R^T) == (q @ R) . k_rot, so rotating the
    [tokens, heads, D] queries once replaces rotating every cached key back (fp32, as the reference's read)."""
    rotation = getattr(cache, "k_rotation", None)
    if rotation is None:
        return q.to(torch.float32)
    return q.to(torch.float32) @ rotation.to(q.device)


def _launch(
    out: torch.Tensor,  # [B, H, D]
    q: torch.Tensor,  # [B, H, D]
    cache: KVCache | Int8KVCache,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
    alibi_slopes: torch.Tensor | None,
    first_key: int,
) -> None:
    int8 = isinstance(cache, Int8KVCache)
    k, v = (cache.k_q, cache.v_q) if int8 else (cache.k, cache.v)
    k_scale, v_scale = (cache.k_scale, cache.v_scale) if int8 else (k, v)  # unused pointers without INT8
    if int8 and (k_scale.stride() != v_scale.stride() or k_scale.stride(2) != 1):
        raise ValueError("k_scale and v_scale must share one contiguous [num_blocks, block_size, kv_heads] layout")
    num_decodes, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of the cache's {kv_heads} kv heads")
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("the head_dim axis of q and of the K/V cache must be contiguous")
    slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous() if alibi_slopes is not None else q
    kernel = launcher(_decode_attention_kernel, q.device)
    kernel[(num_decodes, kv_heads)](
        q, k, v, k_scale, v_scale, block_tables, context_lens, slopes, out,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale, first_key, block_size, head_dim, heads // kv_heads,
        G_PAD=next_power_of_2(heads // kv_heads, 16),
        D_PAD=next_power_of_2(head_dim, 16),
        BLOCK_N=BLOCK_N,
        INT8=int8,
        ALIBI=alibi_slopes is not None,
        DOT_F32=int8 or dot_in_fp32(q.device, q.dtype, k.dtype),
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    cache: KVCache | Int8KVCache,
    meta: AttnMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    """Drop-in for ``attention._decode_attention`` (``meta.decode_mask`` is not read: the kernel masks from the
    context lengths and ``first_key``, the same rule ``attention.decode_mask`` encodes)."""
    out = torch.empty_like(q)
    query = queries_in_key_basis(q, cache) if isinstance(cache, Int8KVCache) else q
    _launch(out, query, cache, meta.decode_block_tables, meta.decode_context_lens, scale, alibi_slopes, meta.first_key)
    return out
