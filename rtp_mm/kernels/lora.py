"""Grouped low-rank updates (LoRA) over a flattened batch whose rows belong to different adapters.

A projection's output for the rows of adapter i gains ``(x_rows @ A_i^T) @ B_i^T`` (the adapter's scale folded into
``B_i``); a step with no adapter row never calls this, and no weight is merged between steps. Two forms:

- ``add_lora_``: one adapter's rows (``RowGroup``: a slice when contiguous, else an index tensor gathered and scattered
  back), a pair of small matmuls per adapter present;
- ``add_lora_stacked_``: every adapter of the step at once, their A and B stacked (``A_cat`` [R_total, in],
  ``B_cat`` [out, R_total]): each row is multiplied by every adapter's A, a mask keeps only its own adapter's
  columns, then one matmul with B. Three ops per projection whatever the number of adapters, for ``R_total / R``
  times the (small) low-rank flops: with several adapters in a step the per-op cost of the grouped form (four ops
  per adapter, each waking every matmul thread) dominates on CPU.

The reference is ``lora_delta_reference`` (a dense per-row loop in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RowGroup:
    """The rows of one adapter in a step: ``rows`` is a slice of the flattened batch or a long tensor of row indices;
    ``adapter`` is whatever the caller keys its weights on."""

    rows: slice | torch.Tensor
    adapter: Any


def add_lora_(
    out: torch.Tensor,  # [tokens, out_features], updated in place
    x: torch.Tensor,  # [tokens, in_features]
    rows: slice | torch.Tensor,
    a: torch.Tensor,  # [rank, in_features]
    b: torch.Tensor,  # [out_features, rank], scale included
) -> torch.Tensor:
    if isinstance(rows, slice):
        out[rows].addmm_(x[rows] @ a.t(), b.t())  # a view: the second matmul adds in place
    else:
        out.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
    return out


def add_lora_stacked_(
    out: torch.Tensor,  # [tokens, out_features], updated in place
    x: torch.Tensor,  # [tokens, in_features]
    a_cat: torch.Tensor,  # [R_total, in_features]: the step's adapters' A, stacked
    b_cat: torch.Tensor,  # [out_features, R_total]: their B, same column order
    mask: torch.Tensor,  # [tokens, R_total]: 1 where the column belongs to the row's adapter, else 0
) -> torch.Tensor:
    xa = x @ a_cat.t()
    xa.mul_(mask)
    return out.addmm_(xa, b_cat.t())


def lora_delta_reference(
    x: torch.Tensor, row_weights: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> torch.Tensor:  # [tokens, out_features] float32
    """The oracle: each row on its own, in float32, with the dense update ``B @ A`` (None: no adapter)."""
    rows = []
    for i, weights in enumerate(row_weights):
        if weights is None:
            rows.append(None)
            continue
        a, b = weights
        rows.append(x[i].float() @ (b.float() @ a.float()).t())
    width = next(r.shape[0] for r in rows if r is not None)
    return torch.stack([torch.zeros(width) if r is None else r for r in rows])
