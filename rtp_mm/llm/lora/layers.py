"""LoRA as transformations of a built decoder: merged into the weights, or a wrapper around each projection.

``merge`` adds ``B @ A`` into the plain ``nn.Linear`` weights once (before any weight-storage transform), after which
the model is an ordinary model. ``install`` wraps every projection LoRA can target in a ``LoraLinear`` that runs the
wrapped module unchanged (fp32, packed, half or int8) and adds the updates of the adapters present in the step to
their rows (``rtp_mm.kernels.lora``). Which rows belong to which adapter is the step's ``StepRows``: the runner sets
it around one forward and clears it after. It is shared by the wrappers rather than passed through every layer's
signature, so the decoder's maths and its callers stay unaware of LoRA, and a forward outside a step (warm-up,
embeddings) sees no groups and runs the base model. With several adapters in a step each projection applies them all
at once from their stacked weights (``add_lora_stacked_``); the stacks are built on first use and kept while the
step's set of adapters stays the same (usually for many decode steps), one set at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from rtp_mm.kernels.lora import RowGroup, add_lora_, add_lora_stacked_
from rtp_mm.llm.lora.mapping import LoraWeight

# The stacked form multiplies every row by every adapter's A and B: used while that costs at most this fraction of
# the projection itself (R_total * (in + out) <= STACKED_MAX_COST * in * out), else the grouped form.
STACKED_MAX_COST = 0.5

Stack = tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]  # A_cat [R_total, in], B_cat [out, R_total], ranks


class StepRows:
    """The rows of the current step per adapter; empty outside a step and in steps without adapter rows.
    Invariant: ``_stacks`` hold the weights of exactly the adapters in ``_adapters`` (which it keeps alive, so an
    identity check is enough to know they are still the same)."""

    def __init__(self) -> None:
        self.groups: tuple[RowGroup, ...] = ()
        self.row_owner: torch.Tensor | None = None  # [tokens] position of each row's adapter in groups, -1 for none
        self._adapters: tuple = ()
        self._stacks: dict[str, Stack | None] = {}
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def begin(self, groups: tuple[RowGroup, ...], row_owner: torch.Tensor | None) -> None:
        adapters = tuple(group.adapter for group in groups)
        same = len(adapters) == len(self._adapters) and all(
            a is b for a, b in zip(adapters, self._adapters, strict=True)
        )
        if len(adapters) > 1 and not same:  # a step with one adapter uses no stack: the last set's stay for later
            self._adapters, self._stacks = adapters, {}
        self.groups, self.row_owner = groups, row_owner

    def end(self) -> None:
        self.groups, self.row_owner, self._masks = (), None, {}

    def forget(self) -> None:
        """Drop the stacks (after an update: a removed adapter's weights live only as long as its requests)."""
        self._adapters, self._stacks = (), {}

    def stacked(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A_cat, B_cat, row mask) of the step's adapters for ``module_name``, or None: use the grouped form."""
        if module_name not in self._stacks:
            self._stacks[module_name] = _stack([a.weights.get(module_name) for a in self._adapters])
        stack = self._stacks[module_name]
        if stack is None or self.row_owner is None:
            return None
        a_cat, b_cat, ranks = stack
        mask = self._masks.get(ranks)
        if mask is None:
            device = a_cat.device
            owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device))
            mask = self._masks[ranks] = (self.row_owner[:, None] == owner[None, :]).to(a_cat.dtype)
        return a_cat, b_cat, mask


def _stack(weights: list[LoraWeight | None]) -> Stack | None:
    present = [w for w in weights if w is not None]
    if not present:
        return None  # no adapter of the step targets this projection: the grouped form adds nothing
    a_cat = torch.cat([w.a for w in present])
    out_features, in_features = present[0].b.shape[0], a_cat.shape[1]
    if a_cat.shape[0] * (in_features + out_features) > STACKED_MAX_COST * in_features * out_features:
        return None
    ranks = tuple(0 if w is None else w.a.shape[0] for w in weights)
    return a_cat, torch.cat([w.b for w in present], dim=1), ranks


class LoraLinear(nn.Module):
    """Drop-in for a projection: ``base(x)`` plus, for each adapter group of the step, its low-rank update on its
    rows. ``RowGroup.adapter`` must carry ``weights``: decoder module name -> ``LoraWeight``."""

    def __init__(self, base: nn.Module, module_name: str, step_rows: StepRows):
        super().__init__()
        self.base = base
        self.module_name = module_name
        self.step_rows = step_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        groups = self.step_rows.groups
        if not groups:
            return out
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        stacked = self.step_rows.stacked(self.module_name) if len(groups) > 1 else None
        if stacked is not None:
            add_lora_stacked_(out2, x2, *stacked)
            return out
        for group in groups:
            weight: LoraWeight | None = group.adapter.weights.get(self.module_name)
            if weight is not None:
                add_lora_(out2, x2, group.rows, weight.a, weight.b)
        return out


def install(model: nn.Module, module_names: list[str], step_rows: StepRows) -> None:
    """Wrap each named projection of ``model`` (idempotent: a wrapped one is left as it is)."""
    for name in module_names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, attr)
        if not isinstance(child, LoraLinear):
            setattr(parent, attr, LoraLinear(child, name, step_rows))


@torch.no_grad()
def merge(model: nn.Module, weights: dict[str, LoraWeight]) -> None:
    """Add each update into its projection's weight, in float32 (the model's plain nn.Linear layers)."""
    for name, update in weights.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear, f"{name} is a {type(linear).__name__}: merge before weight transforms"
        delta = update.b.float() @ update.a.float()
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
