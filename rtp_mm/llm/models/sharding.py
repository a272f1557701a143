"""Tensor-parallel sharding of the decoder: which part of every parameter a rank holds, as data.

Megatron's split, over the decoder's fused internal layout (``decoder.py``):
  * column-parallel ``attn.qkv`` (rank r keeps its query heads and its kv heads of each of the q, k and v sections;
    with fewer kv heads than ranks each kv head is replicated on ranks/kv_heads ranks, the ones whose query heads
    use it) and ``mlp.gate_up`` / ``mlp.up`` (its slice of the intermediate rows of each section);
  * row-parallel ``attn.o`` and ``mlp.down`` (its columns), whose partial outputs are summed by one all-reduce each;
    their bias is added once: rank 0 holds it, the other ranks hold zeros;
  * with TP_SPLIT_EMB_AND_LMHEAD, the embedding and LM head by vocabulary rows (ceil(vocab / ranks) per rank, the last
    padded with zero rows): the lookup is masked and all-reduced, the logits all-gathered;
  * everything else (norms, learned positions) replicated.

A rank's ``DecoderSpec`` is the checkpoint's with its own head, kv-head and intermediate counts
(``shard_spec``); the vocabulary size stays the model's, which is what the engine validates token ids against.
``Shard.rule`` gives each parameter's slicing, which the weight loader applies to the tensor in the internal layout
(after a family transform), or pushes down to the checkpoint reader (``read_plan``) when a source maps onto one
section untransformed, so that safetensors and GGUF ranks read only their rows.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from rtp_mm.errors import CheckpointError, ConfigError
from rtp_mm.llm.models.decoder import DecoderSpec

# (dim, start, stop, full size along dim) of one checkpoint tensor: a reader whose tensor is not ``full`` long there
# returns it whole, and the loader slices it after all.
ReadSlice = tuple[int, int, int, int]


@dataclass(frozen=True)
class Slices:
    """Along ``dim``, keep rows [lo, hi) of each consecutive section (size, lo, hi); append zero rows to ``pad_to``."""

    dim: int
    sections: tuple[tuple[int, int, int], ...]
    pad_to: int = 0

    def apply(self, t: torch.Tensor, name: str) -> torch.Tensor:
        total = sum(size for size, _, _ in self.sections)
        if t.shape[self.dim] != total:
            raise CheckpointError(f"{name}: dimension {self.dim} is {t.shape[self.dim]}, the model expects {total}")
        pieces, offset = [], 0
        for size, lo, hi in self.sections:
            pieces.append(t.narrow(self.dim, offset + lo, hi - lo))
            offset += size
        return self.pad(torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0].clone())

    def finish(self, t: torch.Tensor, name: str, presliced: bool) -> torch.Tensor:
        """This rank's part of ``t``: already cut by the reader (``presliced``: only the padding is left), or whole."""
        return self.pad(t) if presliced else self.apply(t, name)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        missing = self.pad_to - t.shape[self.dim] if self.pad_to else 0
        if missing <= 0:
            return t
        shape = list(t.shape)
        shape[self.dim] = missing
        return torch.cat([t, t.new_zeros(shape)], dim=self.dim)


@dataclass(frozen=True)
class FirstRankOnly:
    """A row-parallel bias: summed over ranks by the all-reduce, so only rank 0 keeps it."""

    keep: bool

    def apply(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return t.clone() if self.keep else torch.zeros_like(t)

    def finish(self, t: torch.Tensor, name: str, presliced: bool) -> torch.Tensor:
        return self.apply(t, name)  # never read sliced: a bias is whole in the file


Rule = Slices | FirstRankOnly

_QKV = re.compile(r"layers\.\d+\.attn\.qkv\.(weight|bias)")
_O_WEIGHT = re.compile(r"layers\.\d+\.attn\.o\.weight")
_GATE_UP = re.compile(r"layers\.\d+\.mlp\.gate_up\.(weight|bias)")
_UP = re.compile(r"layers\.\d+\.mlp\.up\.(weight|bias)")
_DOWN_WEIGHT = re.compile(r"layers\.\d+\.mlp\.down\.weight")
_ROW_BIAS = re.compile(r"layers\.\d+\.(attn\.o|mlp\.down)\.bias")
_VOCAB = ("embed.weight", "lm_head.weight", "lm_head.bias")


def check_tp(spec: DecoderSpec, size: int, model_type: str) -> None:
    """Start-up check that the model divides over ``size`` ranks, naming both numbers and what to change."""
    if size == 1:
        return
    hint = f"set TP_SIZE to a divisor of it (MODEL_TYPE={model_type})"
    if spec.num_heads % size:
        raise ConfigError(f"TP_SIZE={size} does not divide the {spec.num_heads} attention heads: {hint}")
    kv = spec.num_kv_heads
    if kv % size and size % kv:
        raise ConfigError(
            f"TP_SIZE={size} and the {kv} kv heads: one must divide the other (kv heads are split, or replicated "
            f"when fewer than the ranks): {hint}"
        )
    if spec.intermediate_size % size:
        rows = spec.intermediate_size
        raise ConfigError(f"TP_SIZE={size} does not divide the MLP's {rows} intermediate rows: {hint}")


def shard_spec(spec: DecoderSpec, size: int) -> DecoderSpec:
    """A rank's spec: its heads, kv heads and intermediate rows (check_tp first)."""
    if size == 1:
        return spec
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // size,
        num_kv_heads=max(1, spec.num_kv_heads // size),
        intermediate_size=spec.intermediate_size // size,
    )


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size``; ``full`` is the checkpoint's spec."""

    rank: int
    size: int
    split_vocab: bool
    full: DecoderSpec

    @property
    def vocab_rows(self) -> int:
        """Vocabulary rows per rank (split) or the whole vocabulary."""
        v = self.full.vocab_size
        return -(-v // self.size) if self.split_vocab else v

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows if self.split_vocab else 0

    def head_range(self) -> tuple[int, int]:
        per = self.full.num_heads // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_head_range(self) -> tuple[int, int]:
        kv = self.full.num_kv_heads
        if kv >= self.size:
            per = kv // self.size
            return self.rank * per, (self.rank + 1) * per
        first = self.rank // (self.size // kv)  # the kv head this rank's query heads share
        return first, first + 1

    def alibi_slice(self, slopes: torch.Tensor) -> torch.Tensor:
        lo, hi = self.head_range()
        return slopes[lo:hi].clone()

    def rule(self, name: str) -> Rule | None:
        """How parameter ``name`` (internal layout, full shape) becomes this rank's; None: replicated."""
        spec, d = self.full, self.full.head_dim
        if name in _VOCAB:
            if not self.split_vocab:
                return None
            lo = min(self.vocab_start, spec.vocab_size)
            hi = min(lo + self.vocab_rows, spec.vocab_size)
            return Slices(0, ((spec.vocab_size, lo, hi),), pad_to=self.vocab_rows)
        if _QKV.fullmatch(name):
            (h0, h1), (k0, k1) = self.head_range(), self.kv_head_range()
            kv = (spec.kv_size, k0 * d, k1 * d)
            return Slices(0, ((spec.q_size, h0 * d, h1 * d), kv, kv))
        if _O_WEIGHT.fullmatch(name):
            h0, h1 = self.head_range()
            return Slices(1, ((spec.q_size, h0 * d, h1 * d),))
        inter = self._inter_section()
        if _GATE_UP.fullmatch(name):
            return Slices(0, (inter, inter))
        if _UP.fullmatch(name):
            return Slices(0, (inter,))
        if _DOWN_WEIGHT.fullmatch(name):
            return Slices(1, (inter,))
        if _ROW_BIAS.fullmatch(name):
            return FirstRankOnly(self.rank == 0)
        return None

    def _inter_section(self) -> tuple[int, int, int]:
        per = self.full.intermediate_size // self.size
        return self.full.intermediate_size, self.rank * per, (self.rank + 1) * per


def read_plan(shard: Shard, expanded: dict[str, tuple | object], params: set[str]) -> dict[str, ReadSlice]:
    """Which checkpoint tensors this rank may read as a slice (the loader sees from a tensor's length whether the reader
    did cut it).

    A target qualifies when each of its sources is untransformed and maps onto one section of its rule (a plain source
    onto a one-section rule; the parts of a dim-0 ``Cat`` onto the sections, e.g. q/k/v or gate/up) and no source feeds
    another target. Everything else is read whole, one tensor at a time, and sliced after the family's transform.
    """
    plan: dict[str, ReadSlice] = {}
    owners: dict[str, list[str]] = {}
    candidates: dict[str, list[tuple[str, ReadSlice]]] = {}
    for target, source in expanded.items():
        if target not in params:
            continue
        parts = getattr(source, "parts", source)
        for src in parts:
            owners.setdefault(src.name, []).append(target)
        rule = shard.rule(target)
        if not isinstance(rule, Slices) or any(src.transform is not None for src in parts):
            continue
        cat_dim = getattr(source, "dim", None)
        if cat_dim is None and len(rule.sections) == 1:
            size, lo, hi = rule.sections[0]
            candidates[target] = [(parts[0].name, (rule.dim, lo, hi, size))]
        elif cat_dim == rule.dim == 0 and len(parts) == len(rule.sections):
            sections = zip(parts, rule.sections, strict=True)
            candidates[target] = [(src.name, (0, lo, hi, size)) for src, (size, lo, hi) in sections]
    for reads in candidates.values():
        if all(len(owners[name]) == 1 for name, _ in reads):
            plan.update(reads)
    return plan
