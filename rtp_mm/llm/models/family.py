"""What a family file returns for one checkpoint: the decoder spec and how to load its weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.weights import WeightTable


@dataclass(frozen=True)
class FamilyModel:
    spec: DecoderSpec
    table: WeightTable  # internal parameter name -> checkpoint source(s)
    drop: tuple[str, ...] = ()  # regexes of checkpoint keys that are read and ignored (e.g. rotary inv_freq)
    rename: Callable[[str], str] | None = None  # applied to checkpoint keys before the table lookup
