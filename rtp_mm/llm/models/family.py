"""A model family, declared once in its own file, and what its builder returns for one checkpoint.

``Family`` is the whole declaration: the MODEL_TYPE names that select it, how its checkpoints are recognised, how one
becomes a decoder (``build`` -> ``FamilyModel``: a ``DecoderSpec`` plus a weight-name table), and the family's own
tokenizer adapter and vision encoder where it has them. The registry (``rtp_mm.llm.models.FAMILIES``) lists every
declaration, one line per family file; everything else (MODEL_TYPE lookup, detection, tokenizer and vision loading)
reads it from there.

The tokenizer adapter and the vision encoder live above this package (``rtp_mm.tokenizers``, ``rtp_mm.vision``), which
the engine never imports: a family names them as ``"module:function"`` strings that the loaders above resolve.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rtp_mm.llm.models.decoder import DecoderSpec
from rtp_mm.llm.models.weights import WeightTable


@dataclass(frozen=True)
class FamilyModel:
    spec: DecoderSpec
    table: WeightTable  # internal parameter name -> checkpoint source(s)
    drop: tuple[str, ...] = ()  # regexes of checkpoint keys that are read and ignored (e.g. rotary inv_freq)
    rename: Callable[[str], str] | None = None  # applied to checkpoint keys before the table lookup


# (config.json, checkpoint tensor names, MODEL_TYPE) -> the decoder spec and weight table of that checkpoint
BuildFn = Callable[[dict[str, Any], set[str], str], FamilyModel]


@dataclass(frozen=True)
class Family:
    """One family. Invariants: ``model_types`` is non-empty; the values of ``architectures`` and ``hf_model_types``
    are among ``model_types``; names are unique across the registry (checked by ``registry``)."""

    name: str
    model_types: tuple[str, ...]  # the seed's MODEL_TYPE names that select this family
    build: BuildFn
    # Detection of a checkpoint whose MODEL_TYPE is not set: config.json ``architectures`` entries, then its
    # ``model_type``, each mapped to the MODEL_TYPE it implies.
    architectures: Mapping[str, str] = field(default_factory=dict)
    hf_model_types: Mapping[str, str] = field(default_factory=dict)
    # When several families list the same name (ChatGLM's, Qwen v1's), the one whose ``detect`` accepts the config
    # wins, else the one without ``detect``.
    detect: Callable[[dict[str, Any]], bool] | None = None
    # Families with the same non-empty layout read each other's checkpoints (RTP-LLM serves InternLM through Llama,
    # Baichuan-7B is a Llama with W_pack): MODEL_TYPE may name either.
    layout: str = ""
    # "module:function" (tokenizer folder -> tokenizer or None): the family's own tokenizer, tried before the
    # generic ones (tokenizer.json through transformers, sentencepiece by tokenizer_class, GGUF metadata).
    tokenizer: str = ""
    # "module:function" (ckpt_path, config, extra_data_path, device, dtype) -> VisionModel; "" = text only.
    vision: str = ""
    embedding: bool = False  # an embedding model: pooled vectors, no generation
    # A P-tuning v2 prefix (PTUNING_PATH) means past K/V fed before a prompt whose positions still start at 0
    # (ChatGLM's prefix encoder, ptuning.py); families without that meaning refuse a prefix at start-up.
    ptuning: bool = False

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError(f"family {self.name!r} declares no MODEL_TYPE")
        implied = set(self.architectures.values()) | set(self.hf_model_types.values())
        if not implied <= set(self.model_types):
            raise ValueError(f"family {self.name!r}: detection implies {sorted(implied - set(self.model_types))}")


def registry(families: Iterable[Family]) -> dict[str, Family]:
    """name -> Family, refusing a repeated family name or MODEL_TYPE (two declarations of one thing)."""
    by_name: dict[str, Family] = {}
    seen_types: dict[str, str] = {}
    for family in families:
        if family.name in by_name:
            raise ValueError(f"family {family.name!r} is declared twice")
        for model_type in family.model_types:
            if model_type in seen_types:
                raise ValueError(f"MODEL_TYPE {model_type!r} is declared by {seen_types[model_type]} and {family.name}")
            seen_types[model_type] = family.name
        by_name[family.name] = family
    return by_name


def resolve(target: str) -> Any:
    """The object a family names as ``"module:attribute"`` (its tokenizer adapter or vision loader), imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
