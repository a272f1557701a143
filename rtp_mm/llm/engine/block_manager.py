"""BlockManager: ref-counted KV-cache blocks with an LRU free list and an optional prefix cache.

Pure Python (no torch). A block holds ``block_size`` tokens of K/V for every layer. Blocks whose content is known
(full blocks of a sequence) get a content hash chained over the whole prefix (token ids plus the content hashes of
any image rows inside the block), so a later request with the same prefix can share them. A block with
``ref_count == 0`` sits in the free list in least-recently-freed order; if it carries a hash it is still findable in
the cache until allocation reuses it (LRU eviction happens exactly when free blocks run out).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from rtp_mm.llm.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix cache


@dataclass
class BlockManagerStats:
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    evictions: int = 0
    per_request_hashes: dict[int, list[bytes]] = field(default_factory=dict)


def hash_block(parent: bytes, token_ids: list[int], extra: tuple[str, ...] = ()) -> bytes:
    """Content hash of one full block, chained to the hash of everything before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    for key in extra:
        h.update(b"\x00mm:" + key.encode())
    return h.digest()


class BlockManager:
    """Owns block ids ``0..num_blocks-1``. Invariant: every block is either referenced (ref_count > 0) or in
    ``_free`` exactly once; ``_cached`` maps a hash to a block that carries that hash."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.stats = BlockManagerStats()
        self._hashes: dict[int, list[bytes]] = self.stats.per_request_hashes  # request_id -> full-block hashes

    # ---- accounting -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------------------
    def _block_extra(self, req: Request, start: int, end: int) -> tuple[str, ...]:
        """Image content hashes of every multimodal span overlapping token range [start, end)."""
        return tuple(
            mm.content_hash for mm in req.mm_inputs if mm.offset < end and mm.offset + mm.embeds.shape[0] > start
        )

    def _full_block_hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the first ``num_tokens // block_size`` blocks of ``req`` (memoised per request). Stops early at
        a block holding image rows without a ``content_hash``: with no identity, such blocks must never be shared."""
        hashes = self._hashes.setdefault(req.request_id, [])
        want = num_tokens // self.block_size
        if len(hashes) < want:
            ids = req.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), want):
                parent = hashes[i - 1] if i else self._root_hash(req)
                extra = self._block_extra(req, i * bs, (i + 1) * bs)
                if "" in extra:
                    break
                extra += _position_key(req, i * bs, (i + 1) * bs)
                hashes.append(hash_block(parent, ids[i * bs : (i + 1) * bs], extra))
        return hashes[:want]

    @staticmethod
    def _root_hash(req: Request) -> bytes:
        """Parent of a request's first block. A prefix-LM prompt's K/V depend on its whole bidirectional part, so its
        blocks are only shared between requests whose bidirectional parts are identical. A LoRA adapter changes every
        K/V, so its requests' blocks chain from the adapter's identity (unique per load, llm/lora/manager.py)."""
        root = b"" if req.adapter is None else hash_block(b"lora", [req.adapter.uid])
        bidirectional_len = req.layout.bidirectional_len
        if not bidirectional_len:
            return root
        return hash_block(root + b"prefix-lm", req.prompt_ids[:bidirectional_len])

    def lookup_prefix(self, req: Request) -> list[int]:
        """Cached blocks for the longest full-block prefix of ``req``, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for h in self._full_block_hashes(req, req.num_tokens - 1):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        self.stats.prefix_query_tokens += req.num_tokens
        return hit

    def register_full_blocks(self, req: Request) -> None:
        """Publish the now-full computed blocks of ``req`` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self._full_block_hashes(req, req.num_computed_tokens)
        for i, h in enumerate(hashes):
            block = self.blocks[req.block_table[i]]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id

    # ---- allocation -------------------------------------------------------------------------------------------
    def can_allocate(self, num_new_blocks: int, reuse: list[int] = ()) -> bool:
        # Reused blocks that are currently free leave the free list when touched.
        reuse_free = sum(1 for b in reuse if self.blocks[b].ref_count == 0)
        return num_new_blocks + reuse_free <= len(self._free)

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cache entry: the block gets new content
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
            self.stats.evictions += 1
        block.ref_count = 1
        return block_id

    def allocate(self, req: Request, num_tokens: int, reuse: list[int] = ()) -> None:
        """Make ``req.block_table`` cover ``num_tokens`` tokens, first sharing ``reuse`` (prefix-cache hits)."""
        assert not req.block_table or not reuse, "prefix blocks are only taken on a fresh admission"
        for block_id in reuse:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            req.block_table.append(block_id)
        need = self.blocks_needed(num_tokens) - len(req.block_table)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(max(0, need)):
            req.block_table.append(self._pop_free())
        if reuse:
            self.stats.prefix_hit_tokens += len(reuse) * self.block_size

    def free(self, req: Request) -> None:
        """Drop ``req``'s references. Blocks reaching zero go to the back of the free list (most recently used)."""
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        req.block_table = []

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Release the blocks of ``req`` past its first ``num_tokens`` tokens (the KV of rejected speculative tokens).
        They held no computed token, so no hash: they go to the front of the free list, reused before cached blocks."""
        keep = self.blocks_needed(num_tokens)
        for block_id in req.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                self._free.move_to_end(block_id, last=False)
        del req.block_table[keep:]

    def forget(self, req: Request) -> None:
        """Drop per-request memo state once the request is finished for good."""
        self._hashes.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()


def _position_key(req: Request, start: int, end: int) -> tuple[str, ...]:
    """Explicit rotary positions of a block (chatglm4v images, GLM prefix-LM) where they differ from the plain
    indices: K/V depend on positions, so blocks are only shared between requests whose tokens sit at the same
    positions."""
    if req.layout.positions is None:
        return ()
    positions = req.positions_of(start, end)
    if positions == list(range(start, end)):
        return ()
    return ("pos:" + ",".join(map(str, positions)),)
