"""BlockManager: block accounting, shared-prefix ref counts, LRU eviction and the prefix-cache hash chain.

Oracles are written out by hand: block counts are ceil(tokens / block_size), expected block ids and eviction orders
are derived step by step in the comments, and cache hits are predicted from which blocks of two prompts are equal.
"""

from __future__ import annotations

import math

import pytest
import torch

from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.request import MultimodalInput, Request

BS = 4  # block_size used throughout


def make_req(request_id: int, ids: list[int], mm: list[MultimodalInput] | None = None) -> Request:
    return Request(request_id, list(ids), GenerateConfig(), max_total_len=len(ids) + 16, mm_inputs=list(mm or ()))


def compute_all(bm: BlockManager, req: Request, reuse: list[int] = ()) -> None:
    """Admit ``req`` for its whole prompt and mark it computed, as scheduler + runner would."""
    bm.allocate(req, req.num_tokens, list(reuse))
    req.num_computed_tokens = req.num_tokens
    bm.register_full_blocks(req)


def probe(bm: BlockManager, request_id: int, ids: list[int], mm: list[MultimodalInput] | None = None) -> list[int]:
    return bm.lookup_prefix(make_req(request_id, ids, mm))


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


# ---- accounting ---------------------------------------------------------------------------------------------------
def test_allocate_grow_and_free_accounting():
    bm = BlockManager(num_blocks=10, block_size=BS)
    req = make_req(1, list(range(10)))
    bm.allocate(req, 10)
    assert len(req.block_table) == math.ceil(10 / BS) == 3
    assert len(set(req.block_table)) == 3
    assert (bm.num_free_blocks, bm.num_used_blocks) == (7, 3)
    assert sorted(ref_counts(bm), reverse=True) == [1, 1, 1] + [0] * 7

    # Growing within the last block allocates nothing; crossing a boundary allocates exactly one block.
    bm.allocate(req, 12)
    assert len(req.block_table) == 3
    bm.allocate(req, 13)
    assert len(req.block_table) == 4 and bm.num_free_blocks == 6

    bm.free(req)
    assert req.block_table == []
    assert bm.num_free_blocks == 10 and bm.num_used_blocks == 0
    assert ref_counts(bm) == [0] * 10


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 40])
def test_blocks_needed_is_ceil(num_tokens):
    assert BlockManager(4, BS).blocks_needed(num_tokens) == math.ceil(num_tokens / BS)


def test_allocate_beyond_capacity_raises_and_can_allocate_agrees():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_req(1, list(range(8)))
    bm.allocate(a, 8)
    assert bm.can_allocate(1) and not bm.can_allocate(2)
    b = make_req(2, list(range(100, 108)))
    with pytest.raises(MemoryError):
        bm.allocate(b, 8)


def test_invalid_sizes_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_req(1, list(range(6)))
    bm.allocate(a, 6)
    stale = make_req(2, [0])
    stale.block_table = list(a.block_table)  # a second owner that never took a reference
    bm.free(a)
    bm.free(a)  # the table was cleared: freeing the same request again is a no-op
    assert bm.num_free_blocks == 4
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(stale)


# ---- shared prefixes ----------------------------------------------------------------------------------------------
def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_req(1, list(range(12)))  # 3 full blocks
    compute_all(bm, a)
    b = make_req(2, list(range(8)) + [50, 51, 52])  # shares blocks 0 and 1 with a, 11 tokens -> 3 blocks
    reuse = bm.lookup_prefix(b)
    assert reuse == a.block_table[:2]
    assert bm.can_allocate(bm.blocks_needed(11) - len(reuse), reuse)
    bm.allocate(b, 11, reuse)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.blocks[b.block_table[2]].ref_count == 1
    assert bm.num_used_blocks == 4  # 3 of a + 1 new of b
    assert bm.stats.prefix_hit_tokens == 2 * BS

    shared, a_tail = a.block_table[:2], a.block_table[2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    assert bm.blocks[a_tail].ref_count == 0
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10 and ref_counts(bm) == [0] * 10


def test_reusing_free_cached_blocks_counts_against_free_list():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = make_req(1, [1, 2, 3, 4])
    compute_all(bm, a)
    cached = list(a.block_table)
    bm.free(a)  # both blocks free but still cached
    long = make_req(2, [1, 2, 3, 4, 5, 6, 7])  # 4 blocks: 2 reused (they leave the free list) + 2 new > 3
    reuse = bm.lookup_prefix(long)
    assert reuse == cached
    assert not bm.can_allocate(bm.blocks_needed(7) - 2, reuse)
    short = make_req(3, [1, 2, 3, 4, 5])  # 3 blocks: 2 reused + 1 new == 3
    reuse = bm.lookup_prefix(short)
    assert reuse == cached and bm.can_allocate(1, reuse)
    bm.allocate(short, 5, reuse)
    assert bm.num_free_blocks == 0 and sorted(short.block_table) == [0, 1, 2]


@pytest.mark.parametrize("num_tokens", range(1, 16))
def test_lookup_leaves_at_least_one_token_to_compute(num_tokens):
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_req(1, list(range(12)))
    compute_all(bm, a)
    ids = list(range(num_tokens))  # a prefix of a (or a plus extra tokens)
    hit = probe(bm, 2, ids)
    # Full blocks of the first num_tokens - 1 tokens, but no more than a has (3 blocks).
    expected = min(3, (num_tokens - 1) // BS)
    assert hit == a.block_table[:expected]
    assert len(hit) * BS < num_tokens


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = make_req(1, list(range(12)))
    compute_all(bm, a)
    assert probe(bm, 2, list(range(12))) == []
    assert all(b.block_hash is None for b in bm.blocks)


def test_only_computed_blocks_are_published():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_req(1, list(range(12)))
    bm.allocate(a, 12)
    a.num_computed_tokens = 7  # a chunked prefill stopped inside block 1
    bm.register_full_blocks(a)
    assert probe(bm, 2, list(range(13))) == a.block_table[:1]
    a.num_computed_tokens = 12
    bm.register_full_blocks(a)
    assert probe(bm, 3, list(range(13))) == a.block_table[:3]


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    compute_all(bm, make_req(1, list(range(12))))
    bm.reset_prefix_cache()
    assert probe(bm, 2, list(range(13))) == []


# ---- LRU eviction -------------------------------------------------------------------------------------------------
def test_lru_eviction_order_of_cached_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    x, y, z = make_req(1, [1, 1]), make_req(2, [2, 2]), make_req(3, [3, 3])
    for req in (x, y, z):  # one full block each: blocks 0, 1, 2 (block 3 never used)
        compute_all(bm, req)
    assert (x.block_table, y.block_table, z.block_table) == ([0], [1], [2])
    for req in (y, x, z):  # free order = recency: y least recently used
        bm.free(req)
    assert bm.num_free_blocks == 4

    # Two fresh blocks: the never-used block 3 first, then the LRU cached block (y's) is evicted.
    w = make_req(4, [9, 9, 9])
    bm.allocate(w, 3)
    assert w.block_table == [3, 1]
    assert bm.stats.evictions == 1
    assert probe(bm, 5, [2, 2, 0]) == []  # y's block is gone
    assert probe(bm, 6, [1, 1, 0]) == [0]  # x's and z's survive
    assert probe(bm, 7, [3, 3, 0]) == [2]

    # Touching x (a prefix hit) makes it most recently used, so z is evicted next.
    x2 = make_req(8, [1, 1, 5])
    reuse = bm.lookup_prefix(x2)
    bm.allocate(x2, 2, reuse)
    bm.free(x2)
    v = make_req(9, [7])
    bm.allocate(v, 1)
    assert v.block_table == [2]
    assert probe(bm, 10, [3, 3, 0]) == []
    assert probe(bm, 11, [1, 1, 0]) == [0]


def test_freed_request_evicts_its_tail_before_its_head():
    # A prefix is only useful from its first block on: evicting the tail first keeps the head findable.
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    a = make_req(1, [1, 2, 3, 4])
    compute_all(bm, a)
    head, tail = a.block_table
    bm.free(a)
    b = make_req(2, [8])
    bm.allocate(b, 1)
    assert b.block_table == [tail]
    assert probe(bm, 3, [1, 2, 3, 4, 5]) == [head]


# ---- the hash chain -----------------------------------------------------------------------------------------------
def test_hash_chain_depends_on_the_whole_prefix():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    base = list(range(100, 112))  # 3 full blocks
    a = make_req(1, base)
    compute_all(bm, a)
    # Same blocks 1 and 2, different block 0: nothing may hit, although later blocks hold identical tokens.
    assert probe(bm, 2, [0] + base[1:] + [7]) == []
    # Differs only in block 1: block 0 hits, block 2 (identical tokens) must not.
    changed = list(base)
    changed[5] = 0
    assert probe(bm, 3, changed + [7]) == a.block_table[:1]
    # Differs only in the last token of block 2.
    changed = list(base)
    changed[11] = 0
    assert probe(bm, 4, changed + [7]) == a.block_table[:2]
    # Token order inside a block matters too.
    swapped = list(base)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert probe(bm, 5, swapped + [7]) == []
    assert probe(bm, 6, base + [7]) == a.block_table


def test_same_block_after_different_prefixes_is_cached_twice():
    # a = [X, Y], b = [Z, Y]: b's Y block holds different K/V (other context), so it needs its own cache entry;
    # a third request [Z, Y, ...] must get b's two blocks, never b's Z followed by a's Y.
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = make_req(1, x + y)
    compute_all(bm, a)
    b = make_req(2, z + y)
    compute_all(bm, b)
    assert probe(bm, 3, z + y + [0]) == b.block_table
    assert probe(bm, 4, x + y + [0]) == a.block_table


def _image(offset: int, rows: int, content_hash: str, fill: float = 0.0) -> MultimodalInput:
    return MultimodalInput(embeds=torch.full((rows, 2), fill), offset=offset, content_hash=content_hash)


def test_hash_chain_depends_on_multimodal_content():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    placeholder = -200
    ids = [1, 2, 3, 4] + [placeholder] * 4 + [5, 6, 7, 8] + [9]  # image rows fill block 1 exactly
    a = make_req(1, ids, [_image(4, 4, "img-a")])
    compute_all(bm, a)
    # Same image: every full block hits.
    assert probe(bm, 2, ids, [_image(4, 4, "img-a")]) == a.block_table[:3]
    # Another image with the same placeholder ids: block 0 only (block 2 follows the image, so it differs too).
    assert probe(bm, 3, ids, [_image(4, 4, "img-b")]) == a.block_table[:1]
    # No image at all (plain placeholder ids): block 0 only.
    assert probe(bm, 4, ids) == a.block_table[:1]


def test_image_spanning_a_block_boundary_keys_both_blocks():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    ids = list(range(1, 13)) + [99]
    a = make_req(1, ids, [_image(6, 4, "img-a")])  # rows 6..9: blocks 1 and 2
    compute_all(bm, a)
    assert probe(bm, 2, ids, [_image(6, 4, "img-a")]) == a.block_table[:3]
    assert probe(bm, 3, ids, [_image(6, 4, "img-b")]) == a.block_table[:1]
    # An image that ends before a block adds nothing to that block's key.
    b = make_req(4, ids, [_image(0, 2, "img-c")])
    compute_all(bm, b)
    assert probe(bm, 5, ids, [_image(0, 2, "img-d")]) == []


def test_images_without_content_hash_are_never_shared():
    # Two different images whose identity is unknown ("" content hash) must not share KV blocks.
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    ids = [1, 2, 3, 4] + [-200] * 4 + [5, 6, 7, 8] + [9]
    a = make_req(1, ids, [_image(4, 4, "", fill=1.0)])
    compute_all(bm, a)
    assert probe(bm, 2, ids, [_image(4, 4, "", fill=2.0)]) == a.block_table[:1]
