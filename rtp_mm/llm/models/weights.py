"""Declarative weight tables and the loader that streams a checkpoint into a model.

A table maps internal parameter names to checkpoint names, ``{i}`` standing for the layer index:
``"layers.{i}.attn.qkv.weight": Cat("model.layers.{i}.self_attn.q_proj.weight", ...)``. Sources may carry a small
named transform (e.g. Gemma's ``plus_one``). Checkpoint keys matched by the family's ``drop`` patterns are skipped;
any other unknown key, a missing parameter or a shape mismatch is a CheckpointError naming the key and both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rtp_mm.errors import CheckpointError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Src:
    """One checkpoint tensor, optionally transformed after reading."""

    name: str
    transform: Transform | None = None


def weight_and_bias(prefixes: dict[str, str]) -> dict[str, str]:
    """``{"layers.{i}.attn.o": P + "self_attn.dense"}`` -> the ``.weight`` and ``.bias`` entries of each prefix
    (LayerNorms and biased projections of the GPT-style layouts come in such pairs)."""
    return {f"{ours}.{part}": f"{theirs}.{part}" for ours, theirs in prefixes.items() for part in ("weight", "bias")}


@dataclass(frozen=True)
class Cat:
    """Several checkpoint tensors concatenated along ``dim`` (fused qkv, gate/up)."""

    parts: tuple[str | Src, ...]
    dim: int = 0

    def __init__(self, *parts: str | Src, dim: int = 0):
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "dim", dim)


Source = str | Src | Cat
WeightTable = dict[str, Source]


def plus_one(t: torch.Tensor) -> torch.Tensor:
    """Gemma stores RMSNorm weights as w for a (1 + w) scale."""
    return t.float() + 1.0


def expand_table(table: WeightTable, num_layers: int) -> dict[str, tuple[Src, ...] | Cat]:
    """Table with ``{i}`` expanded for every layer; values normalised to tuples of Src (or a Cat)."""

    def norm(src: str | Src, i: int | None) -> Src:
        if isinstance(src, str):
            src = Src(src)
        name = src.name.format(i=i) if i is not None else src.name
        return Src(name, src.transform)

    out: dict[str, tuple[Src, ...] | Cat] = {}
    for target, source in table.items():
        layers: Iterable[int | None] = range(num_layers) if "{i}" in target else [None]
        for i in layers:
            name = target.format(i=i) if i is not None else target
            if isinstance(source, Cat):
                out[name] = Cat(*(norm(p, i) for p in source.parts), dim=source.dim)
            else:
                out[name] = (norm(source, i),)
    return out


def load_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    table: WeightTable,
    num_layers: int,
    drop: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
    shard: Any = None,
    read_plan: Mapping[str, tuple[int, int, int, int]] | None = None,
) -> set[str]:
    """Stream ``tensors`` into ``model`` following ``table``. Returns the loaded parameter names.

    Every parameter of the model must be loaded exactly once. Under tensor parallelism ``shard`` (sharding.Shard)
    turns each parameter, in the internal layout, into this rank's part; sources listed in ``read_plan`` may arrive
    already sliced by the reader (see sharding.read_plan), and are then only padded.
    """
    params = dict(model.named_parameters())
    expanded = expand_table(table, num_layers)
    plan = read_plan or {}

    def local(target: str, value: torch.Tensor, names: list[str], parts: list[torch.Tensor]) -> torch.Tensor:
        rule = shard.rule(target) if shard is not None else None
        if rule is None:
            return value
        sliced = all(
            n in plan and p.shape[plan[n][0]] == plan[n][2] - plan[n][1] for n, p in zip(names, parts, strict=True)
        )
        return rule.finish(value, target, sliced)

    unmapped = sorted(set(params) - set(expanded))
    if unmapped:
        raise CheckpointError(f"internal error: weight table has no source for parameters {unmapped[:8]}")
    # checkpoint name -> [(target, slot)]
    wanted: dict[str, list[tuple[str, int, Src]]] = {}
    for target, source in expanded.items():
        if target not in params:
            continue  # e.g. an optional table entry this spec does not use
        parts = source.parts if isinstance(source, Cat) else source
        for slot, src in enumerate(parts):
            wanted.setdefault(src.name, []).append((target, slot, src))
    drop_res = [re.compile(p) for p in drop]
    pending: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    unknown: list[str] = []
    for raw_name, tensor in tensors:
        name = rename(raw_name) if rename else raw_name
        targets = wanted.get(name)
        if targets is None:
            if not any(r.fullmatch(name) for r in drop_res):
                unknown.append(f"{raw_name} {tuple(tensor.shape)}")
            continue
        for target, slot, src in targets:
            value = src.transform(tensor) if src.transform else tensor
            source = expanded[target]
            if not isinstance(source, Cat):
                _copy(params[target], target, local(target, value, [name], [tensor]), raw_name)
                loaded.add(target)
                continue
            got = pending.setdefault(target, {})
            got[slot] = value
            if len(got) == len(source.parts):
                parts = [got[k] for k in range(len(source.parts))]
                fused = torch.cat([p.to(params[target].dtype) for p in parts], dim=source.dim)
                fused = local(target, fused, [p.name for p in source.parts], parts)
                _copy(params[target], target, fused, " + ".join(p.name for p in source.parts))
                loaded.add(target)
                del pending[target]
    if unknown:
        raise CheckpointError(
            f"checkpoint has {len(unknown)} tensors this model type does not use: {unknown[:8]}"
            + (" ..." if len(unknown) > 8 else "")
        )
    missing = sorted(set(params) - loaded)
    if missing:
        detail = [f"{m} <- {[s.name for s in _parts(expanded[m])]}" for m in missing[:8]]
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs: {detail}")
    return loaded


def _parts(source: tuple[Src, ...] | Cat) -> tuple[Src, ...]:
    return source.parts if isinstance(source, Cat) else source


def _copy(param: torch.Tensor, target: str, value: torch.Tensor, source_name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(
            f"shape mismatch for {source_name}: checkpoint {tuple(value.shape)}, model {target} {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
