"""Attention over the paged KV cache: the pure-torch reference backend (runs everywhere, is the test oracle).

The flattened batch holds ``num_decode_tokens`` single-token decode queries first, then one contiguous chunk per
prefill sequence. K/V of this step are written into the cache through ``slot_mapping`` before attending, so a
prefill chunk sees its cached prefix and itself, and a decode sees its whole context. A faster backend must keep
``paged_attention``'s signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    q_start: int  # index of the chunk's first token in the flattened batch
    q_len: int  # tokens in this chunk
    start_pos: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [num_blocks] int64, covers start_pos + q_len tokens
    bidirectional_len: int = 0  # prefix-LM (GLM v1): keys < this are visible to every query of the prompt
    mask: torch.Tensor | None = None  # [1, 1, q_len, start_pos + q_len] additive; None = plain causal from 0


@dataclass(frozen=True)
class AttnMetadata:
    """Everything attention needs about one step's batch; built by the runner, read-only below it."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of every token
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes (one per sequence)
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64: context length including the new token
    decode_max_context: int  # max of decode_context_lens
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] additive (0 / -inf), per step
    prefills: tuple[PrefillChunk, ...]
    block_size: int
    # Cache positions [0, first_key) of every sequence hold no key: the pad in front of a P-tuning prefix that does
    # not fill its reserved blocks (llm/engine/kv_prefix.py). Always masked; 0 without a prefix.
    first_key: int = 0


@dataclass
class KVCache:
    """One layer's cache: [num_blocks, block_size, num_kv_heads, head_dim] each for K and V."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        kv_heads, head_dim = self.k.shape[2], self.k.shape[3]
        self.k.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(self.k.dtype))
        self.v.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(self.v.dtype))

    def gather(self, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given blocks as [*, num_blocks * block_size, num_kv_heads, head_dim]."""
        flat = block_tables.reshape(-1)
        shape = (*block_tables.shape[:-1], -1, self.k.shape[2], self.k.shape[3])
        k = self.k.index_select(0, flat).view(shape)
        v = self.v.index_select(0, flat).view(shape)
        return k.to(dtype), v.to(dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x [..., D] -> (q int8 [..., D], scale float32 [...]) with x ~= q * scale.

    scale = amax / 127, so |x - q * scale| <= scale / 2. An all-zero vector gets scale 0 (and q 0), which
    dequantizes back to exact zeros; the division uses a floor so it never divides by zero.
    """
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=-1) / 127.0
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_int8: q [..., D] int8, scale [...] float32 -> [..., D] in ``dtype`` (multiplied in fp32)."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def key_rotation(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An orthonormal float32 [head_dim, head_dim] matrix R: keys are quantized as k @ R and read back as
    dequant @ R^T. Sylvester's Hadamard / sqrt(head_dim) for a power of two, otherwise a fixed random rotation."""
    if head_dim & (head_dim - 1) == 0:
        rotation = torch.ones(1, 1, dtype=torch.float64)
        while rotation.shape[0] < head_dim:
            rotation = torch.cat([torch.cat([rotation, rotation], 1), torch.cat([rotation, -rotation], 1)])
        rotation /= head_dim**0.5
    else:
        gaussian = torch.randn(head_dim, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        rotation = torch.linalg.qr(gaussian).Q
    return rotation.to(device=device, dtype=torch.float32)


@dataclass
class Int8KVCache:
    """One layer's cache with K/V as int8 [num_blocks, block_size, num_kv_heads, head_dim] plus a float32 scale per
    (token, kv-head) [num_blocks, block_size, num_kv_heads]: head_dim + 4 bytes per token and head instead of
    head_dim * itemsize (RTP-LLM's INT8_KV_CACHE layout). Same write/gather interface as KVCache: K/V are quantized
    on write and gather returns them dequantized, so attention itself is unchanged. A prefill chunk starting at
    position 0 attends to its own unquantized K/V; every later read (decodes, later chunks) sees the int8 values.

    Keys are stored rotated by ``k_rotation`` (QuaRot's Hadamard trick): a few channels of post-RoPE keys are ~5x
    their row's RMS, so a plain per-(token, head) scale (amax / 127) leaves the other channels a coarse step, and the
    error enters the softmax exponent. The rotation spreads those channels over the head (amax / RMS ~3) and, being
    orthonormal, is undone exactly on read: the default model's teacher-forced top-1 agreement goes from 98.6% to
    99.4% and the mean logprob error halves (tests/test_llm/test_int8_kv_quality.py). Values are not rotated: their
    error reaches the output linearly, averaged by the attention weights, and costs a quarter of the keys'.
    """

    k_q: torch.Tensor
    v_q: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_rotation: torch.Tensor | None = None  # [head_dim, head_dim] float32, orthonormal; None: key_rotation's

    def __post_init__(self) -> None:
        if self.k_rotation is None:
            self.k_rotation = key_rotation(self.k_q.shape[-1], self.k_q.device)

    @classmethod
    def empty(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu"
    ) -> Int8KVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def zeros(*dims: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(dims, dtype=dtype, device=device)

        return cls(
            zeros(*shape, dtype=torch.int8),
            zeros(*shape, dtype=torch.int8),
            zeros(*shape[:3], dtype=torch.float32),
            zeros(*shape[:3], dtype=torch.float32),
        )

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        kv_heads, head_dim = self.k_q.shape[2], self.k_q.shape[3]
        k = k.to(torch.float32) @ self.k_rotation
        for x, q_store, scale_store in ((k, self.k_q, self.k_scale), (v, self.v_q, self.v_scale)):
            q, scale = quantize_int8(x)  # [tokens, KVH, D], [tokens, KVH]
            q_store.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, q)
            scale_store.view(-1, kv_heads).index_copy_(0, slot_mapping, scale)

    def gather(self, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K/V of the given blocks as [*, num_blocks * block_size, num_kv_heads, head_dim]."""
        flat = block_tables.reshape(-1)
        kv_heads, head_dim = self.k_q.shape[2], self.k_q.shape[3]
        shape = (*block_tables.shape[:-1], -1, kv_heads, head_dim)
        k = dequantize_int8(self.k_q.index_select(0, flat), self.k_scale.index_select(0, flat), torch.float32)
        k = (k.view(-1, head_dim) @ self.k_rotation.T).to(dtype)  # back from the rotated basis in fp32
        v = dequantize_int8(self.v_q.index_select(0, flat), self.v_scale.index_select(0, flat), dtype)
        return k.view(shape), v.view(shape)


def causal_mask(
    start_pos: int, q_len: int, bidirectional_len: int = 0, device=None, first_key: int = 0
) -> torch.Tensor:
    """Additive mask [1, 1, q_len, start_pos + q_len]: query i (at start_pos + i) sees keys <= its position, plus
    every key below ``bidirectional_len`` (prefix-LM), but none below ``first_key``."""
    total = start_pos + q_len
    q_pos = torch.arange(start_pos, total, device=device)
    key_pos = torch.arange(total, device=device)
    visible = key_pos[None, :] <= q_pos[:, None]
    if bidirectional_len:
        visible = visible | (key_pos[None, :] < bidirectional_len)
    if first_key:
        visible = visible & (key_pos[None, :] >= first_key)
    mask = torch.zeros(q_len, total, device=device, dtype=torch.float32)
    return mask.masked_fill_(~visible, torch.finfo(torch.float32).min)[None, None]


def decode_mask(context_lens: torch.Tensor, length: int, first_key: int = 0) -> torch.Tensor:
    """Additive mask [B, 1, 1, length] hiding the padded tail of each decode's gathered context (and the keys below
    ``first_key``)."""
    key_pos = torch.arange(length, device=context_lens.device)
    mask = torch.zeros(context_lens.shape[0], 1, 1, length, device=context_lens.device, dtype=torch.float32)
    hidden = (key_pos[None, None, None, :] >= context_lens[:, None, None, None]) | (key_pos < first_key)
    return mask.masked_fill_(hidden, torch.finfo(torch.float32).min)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """ALiBi as an additive bias [heads, q, k]: slope * (key_pos - query_pos) (row shifts cancel in softmax)."""
    k_pos = torch.arange(k_len, device=slopes.device, dtype=torch.float32)
    rel = k_pos[None, :] - q_pos[:, None].to(torch.float32)  # [q, k]
    return slopes.to(torch.float32)[:, None, None] * rel[None]


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool = True
) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, L, KVH, D], mask additive float [B or 1, H or 1, T, L]; with no mask, ``causal``
    (T == L) or every query sees every key."""
    heads, kv_heads = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask.to(q.dtype),
        is_causal=mask is None and causal,
        scale=scale,
        enable_gqa=heads != kv_heads,
    )
    return out.transpose(1, 2)


def _decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    cache: KVCache | Int8KVCache,
    meta: AttnMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    """One query per sequence over its whole cached context (padded to the widest block table)."""
    kc, vc = cache.gather(meta.decode_block_tables, q.dtype)  # [B, L, KVH, D]
    if q.shape[0] == 1 and alibi_slopes is None:
        # One sequence: cut the last block's unused tail instead of masking it (no mask: SDPA's fast path).
        ctx, first = meta.decode_max_context, meta.first_key
        return _sdpa(q[:, None], kc[:, first:ctx], vc[:, first:ctx], None, scale, causal=False)[:, 0]
    length = kc.shape[1]
    mask = meta.decode_mask
    if mask is None:
        mask = decode_mask(meta.decode_context_lens, length, meta.first_key)
    if alibi_slopes is not None:
        key_pos = torch.arange(length, device=q.device)
        q_pos = (meta.decode_context_lens - 1).to(torch.float32)
        rel = key_pos[None, :].to(torch.float32) - q_pos[:, None]  # [B, L]
        mask = mask + alibi_slopes.to(torch.float32)[None, :, None, None] * rel[:, None, None, :]
    return _sdpa(q[:, None], kc, vc, mask, scale)[:, 0]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cache: KVCache | Int8KVCache,
    meta: AttnMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    cache.write(k, v, meta.slot_mapping)
    pieces: list[torch.Tensor] = []  # decodes first, then each prefill chunk in batch order
    nd = meta.num_decode_tokens
    if nd:
        pieces.append(_decode_attention(q[:nd], cache, meta, scale, alibi_slopes))
    pieces += prefill_attention(q, k, v, cache, meta, scale, alibi_slopes)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cache: KVCache | Int8KVCache,
    meta: AttnMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads]
) -> list[torch.Tensor]:  # each prefill chunk's [q_len, num_heads, head_dim], in batch order
    """The prefill chunks of a step whose K/V are already written to ``cache``."""
    pieces: list[torch.Tensor] = []
    for chunk in meta.prefills:
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        total = chunk.start_pos + chunk.q_len
        if chunk.start_pos == 0:
            kc, vc = k[sl][None], v[sl][None]
            if alibi_slopes is None and not chunk.bidirectional_len:
                pieces.append(_sdpa(q[sl][None], kc, vc, None, scale)[0])  # plain causal: the fused fast path
                continue
        else:
            kc, vc = cache.gather(chunk.block_table[None], q.dtype)
            kc, vc = kc[:, :total], vc[:, :total]
        mask = chunk.mask
        if mask is None:
            mask = causal_mask(chunk.start_pos, chunk.q_len, chunk.bidirectional_len, q.device, meta.first_key)
        if alibi_slopes is not None:
            q_pos = torch.arange(chunk.start_pos, total, device=q.device)
            mask = mask + alibi_bias(alibi_slopes, q_pos, total)[None]
        pieces.append(_sdpa(q[sl][None], kc, vc, mask, scale)[0])
    return pieces
