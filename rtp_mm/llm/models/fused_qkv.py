"""Re-orderings of the fused qkv projections that checkpoints store, into the decoder's ``[Q | K | V]`` rows.

The decoder's ``attn.qkv`` holds all query heads, then all key heads, then all value heads. Families pack them
differently (legacy-families.md §1.9): BLOOM, GPT-NeoX and MHA Falcon/GPT-BigCode interleave per head
(``[head, 3, head_dim]``), Falcon-40B groups each kv head with its queries (``[kv_head, q_per_kv + 2, head_dim]``).
Each function returns a transform for ``Src`` that works on a weight ``[rows, hidden]`` and on a bias ``[rows]``
alike, since only the row order changes.
"""

from __future__ import annotations

from functools import partial

import torch

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.weights import Transform


def _check_rows(t: torch.Tensor, rows: int, layout: str) -> None:
    if t.shape[0] != rows:
        raise CheckpointError(f"fused qkv tensor {tuple(t.shape)} does not fit the {layout} layout of {rows} rows")


def _per_head_interleaved(t: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    _check_rows(t, 3 * num_heads * head_dim, f"per-head interleaved ({num_heads} heads x {head_dim})")
    rest = t.shape[1:]
    # [heads, 3, head_dim, *rest] -> [3, heads, head_dim, *rest]
    return t.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * num_heads * head_dim, *rest)


def per_head_interleaved(num_heads: int, head_dim: int) -> Transform:
    """``[q_h, k_h, v_h]`` for each head h (MHA only) -> ``[Q | K | V]``."""
    return partial(_per_head_interleaved, num_heads=num_heads, head_dim=head_dim)


def _grouped(t: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    _check_rows(t, (num_heads + 2 * num_kv_heads) * head_dim, f"grouped ({num_heads} q / {num_kv_heads} kv heads)")
    rest = t.shape[1:]
    per_group = num_heads // num_kv_heads
    g = t.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    q = g[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = g[:, per_group].reshape(num_kv_heads * head_dim, *rest)
    v = g[:, per_group + 1].reshape(num_kv_heads * head_dim, *rest)
    return torch.cat([q, k, v])


def grouped(num_heads: int, num_kv_heads: int, head_dim: int) -> Transform:
    """Falcon new-decoder layout: per kv group its query heads, then its key, then its value -> ``[Q | K | V]``."""
    return partial(_grouped, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
