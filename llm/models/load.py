"""Build a family's decoder on the meta device and stream a checkpoint into it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from rtp_mm.llm.loader import open_checkpoint
from rtp_mm.llm.models import family_builder
from rtp_mm.llm.models.decoder import Decoder
from rtp_mm.llm.models.family import FamilyModel
from rtp_mm.llm.models.weights import load_weights

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Decoder
    family_model: FamilyModel
    config: dict[str, Any]  # the checkpoint's config.json (or what GGUF metadata implies)
    generation_config: dict[str, Any] | None
    checkpoint_format: str

    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids: generation_config.json first (RTP-LLM and HF agree), then config.json."""
        for source in (self.generation_config or {}, self.config):
            eos = source.get("eos_token_id")
            if eos is not None:
                return frozenset(eos if isinstance(eos, list) else [eos])
        return frozenset()


def load_model(
    family: str, model_type: str, ckpt_path: str, dtype: torch.dtype, device: str | torch.device
) -> LoadedModel:
    start = time.perf_counter()
    ckpt = open_checkpoint(ckpt_path)
    try:
        config = ckpt.config()
        keys = set(ckpt.keys())
        family_model = family_builder(family, model_type)(config, keys, model_type)
        with torch.device("meta"):
            model = Decoder(family_model.spec)
        model = model.to(dtype).to_empty(device=device)
        load_weights(
            model,
            ckpt.iter_tensors(),
            family_model.table,
            family_model.spec.num_layers,
            drop=family_model.drop,
            rename=family_model.rename,
        )
        generation_config = ckpt.generation_config()
        fmt = ckpt.format
    finally:
        ckpt.close()
    model.eval()
    logger.info(
        "loaded %s (%s, %s) from %s in %.1f s", model_type, fmt, dtype, ckpt_path, time.perf_counter() - start
    )
    return LoadedModel(model, family_model, config, generation_config, fmt)
