"""Build a family's decoder on the meta device and stream a checkpoint into it."""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch

from rtp_mm.errors import ConfigError
from rtp_mm.kernels.collectives import TPGroup
from rtp_mm.llm.loader import open_checkpoint
from rtp_mm.llm.loader.parallel import auto_num_processes, iter_tensors_parallel
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.decoder import Decoder
from rtp_mm.llm.models.family import FamilyModel
from rtp_mm.llm.models.sharding import Shard, check_tp, read_plan, shard_spec
from rtp_mm.llm.models.weights import expand_table, load_weights

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
    family: str,
    model_type: str,
    ckpt_path: str,
    dtype: torch.dtype,
    device: str | torch.device,
    num_load_processes: int = 1,
    tp: TPGroup | None = None,
    split_vocab: bool = True,
) -> LoadedModel:
    """Build the family's decoder and load ``ckpt_path`` into it.

    ``num_load_processes`` is LOAD_CKPT_NUM_PROCESS: >1 reads the shards of a sharded checkpoint in that many spawned
    processes (the caller's script needs an ``if __name__ == "__main__":`` guard), 0 picks a count automatically
    (see ``auto_num_processes``), 1 reads in this process. The weights are bit-identical whichever is chosen.

    With a tensor-parallel group ``tp`` of several ranks the decoder is this rank's shard (``sharding.py``;
    ``split_vocab`` is TP_SPLIT_EMB_AND_LMHEAD), and every tensor is sliced as it streams in: no rank holds more
    than its shard plus the tensor being read.
    """
    if num_load_processes < 0:
        raise ConfigError(
            f"LOAD_CKPT_NUM_PROCESS={num_load_processes}: expected 0 (automatic) or a positive number of processes"
        )
    start = time.perf_counter()
    ckpt = open_checkpoint(ckpt_path)
    try:
        num_processes = num_load_processes or auto_num_processes(ckpt)
        config = ckpt.config()
        keys = set(ckpt.keys())
        family_model = FAMILIES[family].build(config, keys, model_type)
        spec = family_model.spec
        shard = None
        if tp is not None and tp.size > 1:
            check_tp(spec, tp.size, model_type)
            shard = Shard(tp.rank, tp.size, split_vocab, spec)
        with torch.device("meta"):
            model = Decoder(shard_spec(spec, tp.size) if shard else spec, tp=tp if shard else None, shard=shard)
        model = model.to(dtype).to_empty(device=device)
        plan: dict = {}
        if shard is not None:
            expanded = expand_table(family_model.table, spec.num_layers)
            plan = read_plan(shard, expanded, {name for name, _ in model.named_parameters()})
        rename = family_model.rename or (lambda name: name)
        # closing(): a load error stops the loader processes now, not when the traceback is freed.
        with closing(iter_tensors_parallel(ckpt, num_processes, lambda raw: plan.get(rename(raw)))) as tensors:
            load_weights(
                model,
                tensors,
                family_model.table,
                spec.num_layers,
                drop=family_model.drop,
                rename=family_model.rename,
                shard=shard,
                read_plan=plan,
            )
        generation_config = ckpt.generation_config()
        fmt = ckpt.format
    finally:
        ckpt.close()
    model.eval()
    seconds = time.perf_counter() - start
    logger.info(
        "loaded %s (%s, %s) from %s in %.1f s, %d processes", model_type, fmt, dtype, ckpt_path, seconds, num_processes
    )
    return LoadedModel(model, family_model, config, generation_config, fmt)
