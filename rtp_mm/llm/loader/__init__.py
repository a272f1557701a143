"""Checkpoint reading: ``open_checkpoint(path)`` gives one ``Checkpoint`` view over safetensors, .bin and GGUF."""

from rtp_mm.llm.loader.checkpoint import Checkpoint, ShardedCheckpoint, open_checkpoint, read_json
from rtp_mm.llm.loader.gguf_reader import GGUFCheckpoint, gguf_to_hf_name, load_gguf_tokenizer, unpermute_rotary_rows

__all__ = [
    "Checkpoint",
    "GGUFCheckpoint",
    "ShardedCheckpoint",
    "gguf_to_hf_name",
    "load_gguf_tokenizer",
    "open_checkpoint",
    "read_json",
    "unpermute_rotary_rows",
]
