"""Where a PEFT adapter's modules land in the decoder: read off the family's weight table, so every family maps its
own names (and its fused tensors) without a LoRA-specific table.

An adapter names Hugging Face modules (``model.layers.0.self_attn.q_proj``); the checkpoint weight of that module
(``...q_proj.weight``, after the family's ``rename``) is one source of a decoder parameter in the family's table:
the whole of ``layers.0.attn.o.weight``, or one part of a ``Cat`` such as ``layers.0.attn.qkv.weight`` (q, then k,
then v rows). A module's ``lora_B`` has the rows of its weight, so it lands on the same rows; a family transform of
those rows (BLOOM's per-head qkv interleave, GLM's swapped GeGLU halves) is a row permutation, so it applies to
``lora_B`` unchanged (``P(B) @ A == P(B @ A)``). A transform that is not a row permutation, or a fused part whose
size is unknown, makes that module unsupported for LoRA: the adapter is refused naming the module and the family.

Each decoder projection then carries one fused update per adapter: ``A`` = the parts' A matrices stacked [R, in]
and ``B`` [out, R] holding each part's B (scale folded in) at its rows and its own columns, zeros elsewhere, so one
pair of matmuls serves q, k and v together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.lora.peft_files import LoraPair, PeftAdapter
from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.family import FamilyModel
from rtp_mm.llm.models.weights import Cat, Transform, expand_table

_TARGET = re.compile(r"(layers\.\d+\.(attn\.qkv|attn\.o|mlp\.gate_up|mlp\.up|mlp\.down))\.weight")


@dataclass(frozen=True)
class LoraWeight:
    """One decoder projection's update by one adapter: ``out += (x @ a.T) @ b.T``."""

    a: torch.Tensor  # [R, in]
    b: torch.Tensor  # [out, R], scales included


@dataclass(frozen=True)
class Slot:
    """The rows of a decoder projection that one checkpoint weight fills."""

    module: str  # "layers.3.attn.qkv"
    row_start: int
    rows: int
    transform: Transform | None  # a row permutation of those rows (checked), or None


def linear_shapes(spec: DecoderSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection kind the spec's layers have."""
    shapes = {
        "attn.qkv": (spec.q_size + 2 * spec.kv_size, spec.hidden_size),
        "attn.o": (spec.hidden_size, spec.q_size),
        "mlp.down": (spec.hidden_size, spec.intermediate_size),
    }
    if spec.gated_mlp:
        shapes["mlp.gate_up"] = (2 * spec.intermediate_size, spec.hidden_size)
    else:
        shapes["mlp.up"] = (spec.intermediate_size, spec.hidden_size)
    return shapes


def _part_rows(kind: str, num_parts: int, spec: DecoderSpec) -> list[int] | None:
    if kind == "attn.qkv" and num_parts == 3:
        return [spec.q_size, spec.kv_size, spec.kv_size]
    if kind == "mlp.gate_up" and num_parts == 2:
        return [spec.intermediate_size] * 2
    return None


def is_row_permutation(transform: Transform, rows: int) -> bool:
    """True when ``transform`` only reorders the rows of a [rows, k] tensor (probed with row numbers)."""
    probe = torch.arange(rows, dtype=torch.float64)[:, None].repeat(1, 2)
    try:
        out = transform(probe)
    except Exception:
        return False
    return (
        tuple(out.shape) == tuple(probe.shape)
        and torch.equal(out[:, 0], out[:, 1])
        and torch.equal(out[:, 0].sort().values, probe[:, 0])
    )


class LoraTargets:
    """The decoder projections a family's checkpoint weights fill (immutable once built; any thread may map)."""

    def __init__(self, family: str, family_model: FamilyModel):
        spec = family_model.spec
        self.family = family
        self.rename = family_model.rename
        self.drop = [re.compile(p) for p in family_model.drop]
        self.shapes = linear_shapes(spec)
        self.modules: dict[str, tuple[int, int]] = {}  # decoder module -> (out, in)
        self.slots: dict[str, Slot] = {}  # checkpoint weight name -> its rows
        self.refused: dict[str, str] = {}  # checkpoint weight name -> why LoRA cannot target it
        for target, source in expand_table(family_model.table, spec.num_layers).items():
            match = _TARGET.fullmatch(target)
            if match is None or match[2] not in self.shapes:
                continue
            module, kind = match[1], match[2]
            self.modules[module] = self.shapes[kind]
            out_features = self.shapes[kind][0]
            if not isinstance(source, Cat):
                self._add(source[0].name, Slot(module, 0, out_features, source[0].transform))
                continue
            sizes = _part_rows(kind, len(source.parts), spec) if source.dim == 0 else None
            if sizes is None:
                for part in source.parts:
                    self.refused[part.name] = f"a fused {kind} of {len(source.parts)} parts along dim {source.dim}"
                continue
            for part, start, rows in zip(source.parts, _starts(sizes), sizes, strict=True):
                self._add(part.name, Slot(module, start, rows, part.transform))

    def _add(self, name: str, slot: Slot) -> None:
        if slot.transform is not None and not is_row_permutation(slot.transform, slot.rows):
            self.refused[name] = "its weight is transformed beyond a reordering of rows when loaded"
            return
        self.slots[name] = slot

    def map(self, adapter: PeftAdapter, dtype: torch.dtype, device: torch.device | str) -> dict[str, LoraWeight]:
        """Decoder module -> the adapter's fused update; CheckpointError names every module that cannot be served."""
        parts: dict[str, list[tuple[Slot, LoraPair]]] = {}
        refused: list[str] = []
        for hf_module, pair in adapter.modules.items():
            name = hf_module + ".weight"
            name = self.rename(name) if self.rename is not None else name
            slot = self.slots.get(name)
            if slot is None:
                refused.append(f"{hf_module} ({self._why_not(name)})")
                continue
            _, in_features = self.modules[slot.module]
            if pair.b.shape[0] != slot.rows or pair.a.shape[1] != in_features:
                raise CheckpointError(
                    f"{adapter.path}: {hf_module} has lora_A {tuple(pair.a.shape)} and lora_B {tuple(pair.b.shape)}; "
                    f"the model's {hf_module} is [{slot.rows}, {in_features}] (an adapter of another model?)"
                )
            parts.setdefault(slot.module, []).append((slot, pair))
        if refused:
            shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
            raise CheckpointError(
                f"{adapter.path}: LoRA on {shown} is not supported for the {self.family} family; rtp-mm applies LoRA "
                "to the language model's attention and MLP projections"
            )
        return {module: self._fuse(module, items, dtype, device) for module, items in parts.items()}

    def _why_not(self, name: str) -> str:
        if name in self.refused:
            return self.refused[name]
        if any(p.fullmatch(name) for p in self.drop):
            return "not part of the language model"
        return "not a projection of this model's layers"

    def _fuse(
        self, module: str, items: list[tuple[Slot, LoraPair]], dtype: torch.dtype, device: torch.device | str
    ) -> LoraWeight:
        out_features, _ = self.modules[module]
        a = torch.cat([pair.a for _, pair in items])
        b = torch.zeros(out_features, a.shape[0], dtype=torch.float32)
        column = 0
        for slot, pair in items:
            rank = pair.a.shape[0]
            part = pair.b * pair.scale
            if slot.transform is not None:
                part = slot.transform(part)
            b[slot.row_start : slot.row_start + slot.rows, column : column + rank] = part
            column += rank
        return LoraWeight(a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous())


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts
