"""KV blocks shared by every sequence: the P-tuning v2 prefix (``rtp_mm.llm.models.ptuning``).

At start-up the prefix's K/V are written once into ``ceil(pre_seq_len / block_size)`` blocks taken from the top of the
runner's cache; the block manager never owns them, so they are never allocated, freed, evicted or hashed. Each step
the runner puts them in front of every sequence's block table (``attn_metadata``).

Sequence token t stays in its own block t // block_size, slot t % block_size: the prefix region is whole blocks, so
the scheduler, the block manager and the prefix cache keep working in the sequence's own token indices (every
sequence of one engine sees the same prefix, so a cached block's content never depends on more than its hash).
The prefix is right-aligned in its region; the ``pad`` positions before it hold no key and are masked
(``AttnMetadata.first_key``). RTP-LLM instead copies a partly filled last prefix block into each sequence; both let
attention see exactly the ``pre_seq_len`` prefix keys followed by the sequence's own. Rotary positions are untouched:
the prefix keys are stored as given and the prompt still starts at position 0, as in ChatGLM's original code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rtp_mm.errors import ConfigError
from rtp_mm.kernels.attention import AttnMetadata, Int8KVCache, KVCache, PrefillChunk, causal_mask, decode_mask


@dataclass(frozen=True)
class KVPrefix:
    """Invariants: ``block_ids`` are ``num_blocks`` cache blocks no block manager owns; cache positions
    ``[pad, pad + length)`` of the region they form hold the prefix's K/V, ``pad < block_size``."""

    block_ids: torch.Tensor  # [num_blocks] int64 on the cache's device
    length: int  # pre_seq_len: the keys every query sees before its own sequence's
    block_size: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_ids.shape[0])

    @property
    def offset(self) -> int:
        """Cache position of a sequence's token 0: its index in a block table with the prefix blocks in front."""
        return self.num_blocks * self.block_size

    @property
    def pad(self) -> int:
        return self.offset - self.length

    @classmethod
    def reserve(
        cls, caches: list[KVCache | Int8KVCache], block_size: int, kv: torch.Tensor, min_free_blocks: int
    ) -> KVPrefix:
        """Write ``kv`` [num_layers, 2, length, kv_heads, head_dim] into the top blocks of every layer's cache
        (quantized there when the cache is int8). The caller's block manager must own only the blocks below them; at
        least ``min_free_blocks`` (one sequence of MAX_SEQ_LEN) must stay for it, or start-up fails."""
        num_layers, _, length = kv.shape[:3]
        assert num_layers == len(caches) and length > 0, (kv.shape, len(caches))
        store = caches[0].k if isinstance(caches[0], KVCache) else caches[0].k_q  # [num_blocks, block_size, ...]
        total, device = store.shape[0], store.device
        num_blocks = -(-length // block_size)
        if total - num_blocks < min_free_blocks:
            raise ConfigError(
                f"the P-tuning prefix (PTUNING_PATH, pre_seq_len {length}) takes {num_blocks} of the {total} KV "
                f"blocks, leaving fewer than the {min_free_blocks} one sequence of MAX_SEQ_LEN needs; give the KV "
                "cache more memory (KV_CACHE_MEM_MB) or lower MAX_SEQ_LEN"
            )
        block_ids = torch.arange(total - num_blocks, total, dtype=torch.long, device=device)
        prefix = cls(block_ids, length, block_size)
        positions = torch.arange(prefix.pad, prefix.offset, device=device)
        slots = block_ids[positions // block_size] * block_size + positions % block_size
        kv = kv.to(device)
        for layer, cache in enumerate(caches):
            cache.write(kv[layer, 0], kv[layer, 1], slots)
        return prefix

    def attn_metadata(self, meta: AttnMetadata) -> AttnMetadata:
        """``meta`` (built over the sequences' own block tables) with the prefix blocks in front of every table and
        every context shifted by ``offset``; the slots a step writes are unchanged."""
        off, ids = self.offset, self.block_ids
        prefills = tuple(self._shift(chunk) for chunk in meta.prefills)
        if not meta.num_decode_tokens:
            return dataclasses.replace(meta, prefills=prefills, first_key=self.pad)
        tables = torch.cat((ids.expand(meta.num_decode_tokens, -1), meta.decode_block_tables), dim=1)
        lens = meta.decode_context_lens + off
        return dataclasses.replace(
            meta,
            prefills=prefills,
            decode_block_tables=tables,
            decode_context_lens=lens,
            decode_max_context=meta.decode_max_context + off,
            decode_mask=decode_mask(lens, tables.shape[1] * self.block_size, self.pad),
            first_key=self.pad,
        )

    def _shift(self, chunk: PrefillChunk) -> PrefillChunk:
        start_pos = chunk.start_pos + self.offset
        bidirectional_len = chunk.bidirectional_len + self.offset if chunk.bidirectional_len else 0
        return dataclasses.replace(
            chunk,
            start_pos=start_pos,
            block_table=torch.cat((self.block_ids, chunk.block_table)),
            bidirectional_len=bidirectional_len,
            mask=causal_mask(start_pos, chunk.q_len, bidirectional_len, self.block_ids.device, self.pad),
        )
