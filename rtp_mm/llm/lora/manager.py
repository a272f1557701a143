"""The engine's LoRA adapters: which names requests may select, and the rows of each in a step.

RTP-LLM's rules (behaviour reference, sections 1.1, 1.3 and 4): ``LORA_INFO`` with exactly one adapter merges it into
the base weights at load, irreversibly (every request, named or not, gets it; nothing can be updated); with none or
several, adapters stay apart and each request picks one with ``adapter_name`` (none: the base model), and
``POST /update`` replaces the set (the posted map is diffed against the loaded one: changed or absent names are
removed, new ones added), at most ``MAX_LORA_MODEL_SIZE`` of them (-1: no cap).

A request holds its ``LoraAdapter`` from admission to its end, so removing or replacing a name never changes a
request in flight: the old weights live as long as a request refers to them. ``uid`` is unique per engine, so the
prefix cache never shares KV blocks between adapters (nor between two loads of one name).

Threads: ``LoraLoader`` (file reading and mapping) is immutable and runs on any thread, so an update reads its files
off the engine thread; ``LoraManager`` is engine-thread state like the rest of the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from rtp_mm.errors import CheckpointError, ConfigError, InvalidRequest, UpdateError
from rtp_mm.kernels.lora import RowGroup
from rtp_mm.llm.lora import layers
from rtp_mm.llm.lora.mapping import LoraTargets, LoraWeight
from rtp_mm.llm.lora.peft_files import read_peft_adapter
from rtp_mm.llm.models.decoder import Decoder
from rtp_mm.llm.models.family import FamilyModel


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One loaded adapter. Compared by identity: two loads of one folder are two adapters."""

    name: str
    path: str
    uid: int  # unique per engine: the prefix cache's identity of the adapter
    weights: Mapping[str, LoraWeight]  # decoder module ("layers.0.attn.qkv") -> its update


class LoraLoader:
    """Reads PEFT folders into adapters for one model. Immutable (the uid counter aside, which is atomic)."""

    def __init__(self, family: str, family_model: FamilyModel, dtype: torch.dtype, device: torch.device):
        self.targets = LoraTargets(family, family_model)
        self.dtype, self.device = dtype, device
        self._uids = itertools.count(1)

    def load(self, name: str, path: str) -> LoraAdapter:
        """Raises ConfigError (bad path) or CheckpointError (bad folder), naming the adapter's path."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"LoRA adapter name {name!r} must be a non-empty string")
        if not isinstance(path, str) or "://" in path or not Path(path).is_dir():
            raise ConfigError(f"LoRA adapter {name!r}: {path!r} is not a local folder (a PEFT adapter folder)")
        weights = self.targets.map(read_peft_adapter(path), self.dtype, self.device)
        return LoraAdapter(name, str(path), next(self._uids), MappingProxyType(weights))


def diff(loaded: Mapping[str, str], wanted: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """RTP-LLM's update: (names to remove: changed or absent, {name: path} to add: new or changed)."""
    remove = [name for name, path in loaded.items() if wanted.get(name) != path]
    add = {name: path for name, path in wanted.items() if loaded.get(name) != path}
    return remove, add


class LoraManager:
    """The adapters requests may name. Invariants: ``merged`` set means no adapter is kept apart (and none can be
    added); projections are wrapped (``layers.install``) from the first adapter kept apart on."""

    def __init__(self, model: Decoder, family: str, family_model: FamilyModel, max_adapters: int = -1):
        self.model = model
        self.loader = LoraLoader(family, family_model, model.act_dtype, model.norm.weight.device)
        self.max_adapters = max_adapters
        self.adapters: dict[str, LoraAdapter] = {}
        self.merged: tuple[str, str] | None = None  # (name, path) of the adapter merged at start-up
        self.step_rows = layers.StepRows()
        self._installed = False
        self.unsupported = ""  # why this engine cannot take adapters at all (tensor parallelism), "" = it can

    # ---- start-up and updates ---------------------------------------------------------------------------------
    def start(self, lora_infos: Mapping[str, str] | None) -> None:
        """LORA_INFO at build time, on plain nn.Linear weights (before weight transforms): one adapter is merged,
        several are kept apart. ConfigError names the adapter that failed."""
        if not lora_infos:
            return
        if self.unsupported:
            raise ConfigError(f"LORA_INFO: {self.unsupported}")
        self._check_count(len(lora_infos), ConfigError, "LORA_INFO")
        loaded = []
        for name, path in lora_infos.items():
            try:
                loaded.append(self.loader.load(name, path))
            except (CheckpointError, ConfigError) as e:
                raise ConfigError(f"LORA_INFO[{name!r}]: {e.message}") from e
        if len(loaded) == 1:
            layers.merge(self.model, dict(loaded[0].weights))
            self.merged = (loaded[0].name, loaded[0].path)
            return
        self.apply([], loaded)

    def check_update(self, loaded: Mapping[str, str], remove: Sequence[str], add: Mapping[str, str]) -> None:
        """Raise UpdateError before any file is read when the update cannot be applied."""
        if self.unsupported and add:
            raise UpdateError(self.unsupported)
        if self.merged is not None and (remove or add):
            name = self.merged[0]
            raise UpdateError(
                f"LoRA adapter {name!r} is merged into the base weights (LORA_INFO held exactly one adapter, as "
                "RTP-LLM merges it): adapters cannot be changed at run time; start with none or several to update them"
            )
        self._check_count(len(set(loaded) - set(remove) | set(add)), UpdateError, "the update")

    def apply(self, remove: Sequence[str], add: Sequence[LoraAdapter]) -> dict[str, str]:
        """Remove then add, at once (between two steps: no request sees half an update). Returns name -> path."""
        self.check_update(self.infos(), remove, {a.name: a.path for a in add})
        if add and not self._installed:
            layers.install(self.model, list(self.loader.targets.modules), self.step_rows)
            self._installed = True
        self.step_rows.forget()
        for name in remove:
            self.adapters.pop(name, None)
        for adapter in add:
            self.adapters[adapter.name] = adapter
        return self.infos()

    def _check_count(self, count: int, error: type[Exception], what: str) -> None:
        if self.max_adapters >= 0 and count > self.max_adapters:
            raise error(f"{what} would load {count} LoRA adapters; MAX_LORA_MODEL_SIZE={self.max_adapters}")

    # ---- requests ---------------------------------------------------------------------------------------------
    def infos(self) -> dict[str, str]:
        """Adapter name -> path of every name a request may select (the merged one included)."""
        if self.merged is not None:
            return dict([self.merged])
        return {name: adapter.path for name, adapter in self.adapters.items()}

    def resolve(self, name: str | None) -> LoraAdapter | None:
        """The adapter a request's ``adapter_name`` selects (None: the base model, or the merged adapter)."""
        if not name or (self.merged is not None and name == self.merged[0]):
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            loaded = sorted(self.infos())
            raise InvalidRequest(f"adapter_name={name!r} is not a loaded LoRA adapter; loaded: {loaded}")
        return adapter

    @contextmanager
    def step(self, seqs: Sequence[Any]) -> Iterator[None]:
        """Around one forward over ``seqs`` (laid out one after another, ``num_new_tokens`` rows each, as the
        runner lays them out): the wrappers see each adapter's rows."""
        device = self.model.norm.weight.device
        groups = row_groups(seqs, device) if self._installed else ()
        if not groups:
            yield
            return
        # uid order: the same set of adapters gives the same stacks from step to step, whatever the rows' order
        groups = tuple(sorted(groups, key=lambda group: group.adapter.uid))
        owner = None
        if len(groups) > 1:
            owner = torch.full((sum(seq.num_new_tokens for seq in seqs),), -1, dtype=torch.long)
            for position, group in enumerate(groups):
                owner[group.rows.cpu() if isinstance(group.rows, torch.Tensor) else group.rows] = position
            owner = owner.to(device)
        self.step_rows.begin(groups, owner)
        try:
            yield
        finally:
            self.step_rows.end()


def resolve_adapter(manager: LoraManager | None, name: str | None) -> LoraAdapter | None:
    """``manager.resolve`` for an engine that may have no manager (tests build engines by hand)."""
    if manager is not None:
        return manager.resolve(name)
    if name:
        raise InvalidRequest(f"adapter_name={name!r} is not a loaded LoRA adapter; this engine serves none")
    return None


def row_groups(seqs: Sequence[Any], device: torch.device) -> tuple[RowGroup, ...]:
    """One RowGroup per adapter present (a slice when its rows are contiguous); () when no row has an adapter."""
    ranges: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
    row = 0
    for seq in seqs:
        end = row + seq.num_new_tokens
        if seq.adapter is not None:
            spans = ranges.setdefault(id(seq.adapter), (seq.adapter, []))[1]
            if spans and spans[-1][1] == row:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((row, end))
        row = end
    groups = []
    for adapter, spans in ranges.values():
        if len(spans) == 1:
            groups.append(RowGroup(slice(*spans[0]), adapter))
        else:
            index = [r for start, end in spans for r in range(start, end)]
            groups.append(RowGroup(torch.tensor(index, dtype=torch.long, device=device), adapter))
    return tuple(groups)
