"""Drop-in for ``attention.paged_attention`` on the Triton kernels: decodes through ``decode_attention``, each
prefill chunk through ``prefill_attention``. The cache write stays the cache's own (``KVCache.write`` /
``Int8KVCache.write``: an index_copy_, plus the rotation and quantization for int8), so both backends store the same
bytes and the prefix cache and P-tuning blocks are shared between them."""

from __future__ import annotations

import torch

from rtp_mm.kernels.attention import AttnMetadata, Int8KVCache, KVCache
from rtp_mm.kernels.triton.decode_attention import decode_attention
from rtp_mm.kernels.triton.prefill_attention import prefill_attention


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
    out = torch.empty_like(q)  # rows in the reference's order: decodes first, then each chunk's
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = decode_attention(q[:nd], cache, meta, scale, alibi_slopes)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], cache, chunk, scale, alibi_slopes, meta.first_key)
    return out


# Whether a decode graph may capture this op over a cache (llm/engine/cuda_graphs.py): the kernels read the decodes'
# context lengths from tensors, for every cache kind.
paged_attention.graph_safe = lambda cache: True  # type: ignore[attr-defined]
