"""The Triton paged-attention kernels against the pure-torch reference ops of ``rtp_mm.kernels.attention``.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported); the same cases
run compiled on CUDA under the ``gpu`` marker. Caches start full of garbage, not zeros, and block tables are
shuffled, so a read of an unwritten or padded slot cannot hide; K/V of every sequence are written through the cache's
own ``write`` (int8: rotated and quantized), as the engine does.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: CPU tensors can only run interpreted

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need the `triton` package (pip install triton)")

from rtp_mm.kernels.attention import (  # noqa: E402
    AttnMetadata,
    Int8KVCache,
    KVCache,
    PrefillChunk,
    _decode_attention,
    paged_attention,
)
from rtp_mm.kernels.triton.decode_attention import decode_attention  # noqa: E402
from rtp_mm.kernels.triton.paged_attention import paged_attention as triton_paged_attention  # noqa: E402
from rtp_mm.kernels.triton.prefill_attention import prefill_attention  # noqa: E402
from rtp_mm.llm.models.decoder import alibi_slopes  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@dataclasses.dataclass(frozen=True)
class Layout:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.float32  # queries and (unless int8) the cache
    int8: bool = False
    alibi: bool = False


def make_cache(layout: Layout, num_blocks: int, device: torch.device, g: torch.Generator) -> KVCache | Int8KVCache:
    shape = (num_blocks, layout.block_size, layout.kv_heads, layout.head_dim)
    if not layout.int8:
        return KVCache(*(10 * torch.randn(shape, generator=g).to(device, layout.dtype) for _ in range(2)))
    cache = Int8KVCache.empty(*shape, device=device)
    for values, scale in ((cache.k_q, cache.k_scale), (cache.v_q, cache.v_scale)):
        values.copy_(torch.randint(-127, 128, values.shape, generator=g))
        scale.copy_(torch.rand(scale.shape, generator=g))
    return cache


def write_sequences(cache, layout: Layout, lengths: list[int], free: list[int], g: torch.Generator, device):
    """Writes random K/V of each length through shuffled blocks; returns each sequence's block table."""
    tables = []
    for length in lengths:
        num = -(-length // layout.block_size)
        table, free[:] = free[:num], free[num:]
        slots = torch.tensor(
            [table[p // layout.block_size] * layout.block_size + p % layout.block_size for p in range(length)]
        )
        k, v = (torch.randn(length, layout.kv_heads, layout.head_dim, generator=g) for _ in range(2))
        cache.write(k.to(device, layout.dtype), v.to(device, layout.dtype), slots.to(device))
        tables.append(table)
    return tables


def slopes_for(layout: Layout, device) -> torch.Tensor | None:
    return alibi_slopes(layout.heads).to(device) if layout.alibi else None


# (layout, context lengths, first_key): GQA/MQA, odd lengths across block boundaries, a block size that is not a
# power of two, a head_dim that is not, a lone sequence (the reference's unmasked fast path), the P-tuning pad.
DECODE_CASES = {
    "mha": (Layout(4, 4, 16, 4), [1, 5, 9], 0),
    "gqa-odd": (Layout(6, 2, 32, 4), [3, 13, 18], 0),
    "mqa-alibi": (Layout(4, 1, 16, 8, alibi=True), [7, 17, 33], 0),
    "gqa-block6-d24": (Layout(4, 2, 24, 6), [11, 2, 25], 0),
    "single": (Layout(8, 2, 16, 4), [23], 0),
    "first-key": (Layout(4, 2, 16, 4), [9, 14], 3),
    "int8-gqa": (Layout(8, 2, 16, 4, int8=True), [6, 15, 21], 0),
    "int8-mqa-alibi": (Layout(4, 1, 32, 4, int8=True, alibi=True), [5, 19], 0),
    "fp16-gqa": (Layout(8, 2, 32, 4, torch.float16), [4, 17, 30], 0),
    "bf16-alibi": (Layout(4, 2, 16, 8, torch.bfloat16, alibi=True), [9, 26], 0),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention_matches_reference(case, device):
    layout, lengths, first_key = DECODE_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    num_blocks = sum(-(-n // layout.block_size) for n in lengths) + 3  # three blocks are never written
    cache = make_cache(layout, num_blocks, device, g)
    tables = write_sequences(cache, layout, lengths, torch.randperm(num_blocks, generator=g).tolist(), g, device)
    width = max(map(len, tables))
    meta = AttnMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long, device=device),
        num_decode_tokens=len(lengths),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        decode_context_lens=torch.tensor(lengths, device=device),
        decode_max_context=max(lengths),
        decode_mask=None,
        prefills=(),
        block_size=layout.block_size,
        first_key=first_key,
    )
    q = torch.randn(len(lengths), layout.heads, layout.head_dim, generator=g).to(device, layout.dtype)
    scale = 1 / math.sqrt(layout.head_dim)
    expected = _decode_attention(q, cache, meta, scale, slopes_for(layout, device))
    out = decode_attention(q, cache, meta, scale, slopes_for(layout, device))
    assert out.dtype == q.dtype and out.device == q.device
    tol = TOLERANCE[layout.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


# (layout, start_pos, q_len, bidirectional_len, first_key): a first chunk (own K/V) and later chunks (everything
# through the block table), more than one 64-query tile, GLM's bidirectional prefix shorter than / equal to the
# prompt and, shifted by a P-tuning prefix, past start_pos; ALiBi; int8 chunks of both kinds.
PREFILL_CASES = {
    "first-chunk": (Layout(4, 4, 16, 4), 0, 7, 0, 0),
    "chunk-gqa-odd": (Layout(6, 2, 32, 4), 9, 11, 0, 0),
    "first-mqa-alibi": (Layout(4, 1, 16, 8, alibi=True), 0, 13, 0, 0),
    "chunk-alibi-tiles": (Layout(4, 2, 16, 4, alibi=True), 3, 70, 0, 0),
    "bidir": (Layout(4, 2, 16, 4), 0, 10, 6, 0),
    "bidir-whole-prompt": (Layout(4, 1, 24, 6), 0, 9, 9, 0),
    "ptuning-bidir": (Layout(4, 2, 16, 4), 8, 8, 13, 3),
    "int8-chunk": (Layout(8, 2, 16, 4, int8=True), 6, 9, 0, 0),
    "int8-first-alibi": (Layout(4, 2, 16, 4, int8=True, alibi=True), 0, 9, 0, 0),
    "fp16-chunk": (Layout(8, 2, 32, 4, torch.float16), 5, 12, 0, 0),
    "bf16-bidir-alibi": (Layout(4, 2, 16, 4, torch.bfloat16, alibi=True), 0, 11, 7, 0),
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention_matches_reference(case, device):
    layout, start_pos, q_len, bidir, first_key = PREFILL_CASES[case]
    g = torch.Generator().manual_seed(len(case) + 100)
    total = start_pos + q_len
    num_blocks = -(-total // layout.block_size) + 3
    cache = make_cache(layout, num_blocks, device, g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    table = free[: -(-total // layout.block_size)]
    if start_pos:  # earlier chunks already in the cache
        write_sequences(cache, layout, [start_pos], list(table), g, device)
    bs = layout.block_size
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start_pos, total)], device=device)
    chunk = PrefillChunk(0, q_len, start_pos, torch.tensor(table, device=device), bidir)
    meta = AttnMetadata(slots, 0, None, None, 0, None, (chunk,), bs, first_key)
    q = torch.randn(q_len, layout.heads, layout.head_dim, generator=g).to(device, layout.dtype)
    k, v = (torch.randn(q_len, layout.kv_heads, layout.head_dim, generator=g).to(device, layout.dtype) for _ in "kv")
    scale = 1 / math.sqrt(layout.head_dim)
    expected = paged_attention(q, k, v, cache, meta, scale, slopes_for(layout, device))  # writes the chunk's K/V
    out = prefill_attention(q, k, v, cache, chunk, scale, slopes_for(layout, device), first_key)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOLERANCE[layout.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "layout", [Layout(6, 2, 16, 4), Layout(4, 1, 16, 4, int8=True, alibi=True)], ids=["gqa", "mqa-int8-alibi"]
)
def test_paged_attention_drop_in_on_a_mixed_step(layout, device):
    """Two decodes, a first chunk and a later chunk in one flattened step, as ModelRunner.prepare builds it."""
    g = torch.Generator().manual_seed(7)
    bs, prior = layout.block_size, [6, 11, 0, 5]  # tokens already cached per sequence
    new = [1, 1, 9, 7]  # decodes first, then the prefill chunks
    num_blocks = sum(-(-(p + n) // bs) for p, n in zip(prior, new, strict=True)) + 2
    cache = make_cache(layout, num_blocks, device, g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for p, n in zip(prior, new, strict=True):
        tables.append(free[: -(-(p + n) // bs)])
        free = free[len(tables[-1]) :]
    for table, p in zip(tables, prior, strict=True):
        if p:
            write_sequences(cache, layout, [p], list(table), g, device)
    slots = [
        t[pos // bs] * bs + pos % bs for t, p, n in zip(tables, prior, new, strict=True) for pos in range(p, p + n)
    ]
    chunks, row = [], 2
    for i in (2, 3):
        chunks.append(PrefillChunk(row, new[i], prior[i], torch.tensor(tables[i], device=device)))
        row += new[i]
    width = max(len(t) for t in tables[:2])
    meta = AttnMetadata(
        torch.tensor(slots, device=device),
        2,
        torch.tensor([t + [0] * (width - len(t)) for t in tables[:2]], device=device),
        torch.tensor([prior[0] + 1, prior[1] + 1], device=device),
        max(prior[:2]) + 1,
        None,
        tuple(chunks),
        bs,
    )
    tokens = sum(new)
    q = torch.randn(tokens, layout.heads, layout.head_dim, generator=g).to(device)
    k, v = (torch.randn(tokens, layout.kv_heads, layout.head_dim, generator=g).to(device) for _ in "kv")
    twin = dataclasses.replace(cache, **{f.name: getattr(cache, f.name).clone() for f in dataclasses.fields(cache)})
    scale = 1 / math.sqrt(layout.head_dim)
    expected = paged_attention(q, k, v, cache, meta, scale, slopes_for(layout, device))
    out = triton_paged_attention(q, k, v, twin, meta, scale, slopes_for(layout, device))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for f in dataclasses.fields(cache):  # both backends store the same bytes
        assert torch.equal(getattr(twin, f.name), getattr(cache, f.name)), f.name
