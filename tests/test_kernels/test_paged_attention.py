"""paged_attention against an independent dense reference (float64 torch with explicit boolean visibility masks).

Sequences go through the op step by step the way the engine feeds it (ModelRunner.prepare): decodes first in the
flattened batch, then one chunk per prefilling sequence, K/V written into a paged cache through shuffled block
tables. Every query's output is compared with softmax(q k^T * scale + bias) v over its whole sequence. The caches
start full of garbage, not zeros, so a read of a padded or unwritten slot cannot hide.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from rtp_mm.kernels import cpu
from rtp_mm.kernels.attention import (
    AttnMetadata,
    Int8KVCache,
    KVCache,
    PrefillChunk,
    causal_mask,
    decode_mask,
    paged_attention,
)
from rtp_mm.llm.models.decoder import alibi_slopes

BS, D = 4, 16
SCALE = 1 / math.sqrt(D)
# (total length, prompt length, admitted at step, max prefill chunk, bidirectional_len). Lengths 1, 3, 4, 5, 9, 13
# cross the 4-token blocks; chunks of 5 give prefills with start_pos > 0, prompt remainders of one token become
# decodes (as in the scheduler), later admissions mix decodes with prefills, and the last step is a lone decode.
MIXED = [(13, 11, 0, 5, 0), (9, 7, 1, 5, 0), (5, 3, 2, 5, 0), (4, 4, 3, 5, 0), (3, 2, 0, 5, 0), (1, 1, 5, 5, 0)]
# GLM v1 prompts are prefilled in one chunk: bidirectional part shorter than / equal to the prompt, then decodes,
# next to a plain chunked causal prompt in the same batches.
PREFIX_LM = [(10, 7, 0, 7, 5), (8, 6, 1, 6, 6), (9, 9, 0, 5, 0)]
LAYOUTS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (4, 1)}  # (query heads, kv heads)
# The torch reference op and the CPU backend's drop-in (C++ decode attention over the block tables, kernels/cpu).
OPS = {"torch": paged_attention, "cpu": cpu.paged_attention}


@dataclass
class Seq:
    q: torch.Tensor  # [L, H, D]
    k: torch.Tensor  # [L, KVH, D]
    v: torch.Tensor  # [L, KVH, D]
    table: list[int]  # every block the sequence will use; a step sees the prefix covering its tokens
    prompt: int
    bidir: int


def make_seqs(specs, heads: int, kv_heads: int, dtype: torch.dtype, seed: int) -> tuple[list[Seq], int]:
    g = torch.Generator().manual_seed(seed)
    sizes = [-(-spec[0] // BS) for spec in specs]
    num_blocks = sum(sizes) + 3  # three blocks are never written: they keep their garbage
    free = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous, out-of-order tables
    seqs = []
    for (total, prompt, _, _, bidir), size in zip(specs, sizes, strict=True):
        q, k, v = (torch.randn(total, h, D, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
        seqs.append(Seq(q, k, v, free[:size], prompt, bidir))
        free = free[size:]
    return seqs, num_blocks


def garbage_cache(num_blocks: int, kv_heads: int, dtype: torch.dtype, int8: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if not int8:
        return KVCache(*(10 * torch.randn(num_blocks, BS, kv_heads, D, generator=g).to(dtype) for _ in range(2)))
    cache = Int8KVCache.empty(num_blocks, BS, kv_heads, D)
    for values, scale in ((cache.k_q, cache.k_scale), (cache.v_q, cache.v_scale)):
        values.copy_(torch.randint(-127, 128, values.shape, generator=g))
        scale.copy_(torch.rand(scale.shape, generator=g))
    return cache


def schedule(specs) -> list[list[tuple[int, int, int]]]:
    """Steps of (sequence, start, num_new_tokens), decodes (one token) first, like Scheduler + ModelRunner."""
    done, steps = [0] * len(specs), []
    while any(done[i] < spec[0] for i, spec in enumerate(specs)):
        decodes, prefills = [], []
        for i, (total, prompt, admit, chunk, _) in enumerate(specs):
            if admit <= len(steps) and done[i] < total:
                n = 1 if done[i] >= prompt else min(chunk, prompt - done[i])
                (decodes if n == 1 else prefills).append((i, done[i], n))
                done[i] += n
        steps.append(decodes + prefills)
    return steps


def build_step(seqs: list[Seq], entries, give_masks: bool):
    """(q, k, v, AttnMetadata) of one step, built exactly like ModelRunner.prepare."""
    slots, prefills, rows = [], [], []
    for i, start, n in entries:
        table = seqs[i].table[: -(-(start + n) // BS)]  # blocks are allocated as the sequence grows
        slots.extend(table[p // BS] * BS + p % BS for p in range(start, start + n))
        if n > 1:
            bidir = seqs[i].bidir if seqs[i].bidir > start else 0
            mask = causal_mask(start, n, bidir) if give_masks and start else None  # the engine gives None at 0
            prefills.append(PrefillChunk(len(rows), n, start, torch.tensor(table), bidir, mask))
        rows.extend((i, p) for p in range(start, start + n))
    decodes = [(i, start) for i, start, n in entries if n == 1]
    tables, lens, dmask, context = None, None, None, [0]
    if decodes:
        padded = [seqs[i].table[: start // BS + 1] for i, start in decodes]
        width = max(map(len, padded))
        tables = torch.tensor([t + [0] * (width - len(t)) for t in padded])
        context = [start + 1 for _, start in decodes]
        lens = torch.tensor(context)
        dmask = decode_mask(lens, width * BS) if give_masks else None
    meta = AttnMetadata(torch.tensor(slots), len(decodes), tables, lens, max(context), dmask, tuple(prefills), BS)
    q, k, v = (torch.stack([getattr(seqs[i], name)[p] for i, p in rows]) for name in ("q", "k", "v"))
    return q, k, v, meta, rows


def run(seqs, specs, cache, give_masks=True, slopes=None, tamper=None, op=paged_attention):
    """Outputs [L, H, D] per sequence, and which queries sat in a prefill chunk starting at 0 (they attend to their
    own unquantized K/V, see Int8KVCache)."""
    outs = [torch.full_like(s.q, float("nan")) for s in seqs]
    own = [torch.zeros(s.q.shape[0], dtype=torch.bool) for s in seqs]
    for entries in schedule(specs):
        q, k, v, meta, rows = build_step(seqs, entries, give_masks)
        out = op(q, k, v, cache, tamper(meta) if tamper else meta, SCALE, slopes)
        assert out.shape == q.shape and out.dtype == q.dtype
        for row, (i, p) in zip(out, rows, strict=True):
            outs[i][p] = row
        for i, start, n in entries:
            own[i][start : start + n] = n > 1 and start == 0
    return outs, own


def reference(seq: Seq, k=None, v=None, slopes=None) -> torch.Tensor:
    """Dense float64 attention over the sequence; k/v default to the sequence's own."""
    q, k, v = seq.q.double(), (seq.k if k is None else k).double(), (seq.v if v is None else v).double()
    group = q.shape[1] // k.shape[1]  # query head h reads kv head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    pos = torch.arange(q.shape[0])
    qp, kp = pos[:, None], pos[None, :]
    # causal, plus: every prompt query sees every key below bidirectional_len (decodes are after it anyway)
    visible = (kp <= qp) | ((kp < seq.bidir) & (qp < seq.prompt))
    scores = torch.einsum("ihd,jhd->hij", q, k) * SCALE
    if slopes is not None:
        scores = scores + slopes.double()[:, None, None] * (kp - qp).double()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """The documented int8 scheme, written out: per (token, kv head) scale = amax / 127, round, clamp to +-127."""
    scale = x.float().abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x.float() / scale.clamp_min(1e-30)).clamp(-127, 127) * scale


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix / sqrt(n) (n a power of two): the rotation keys are quantized in."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / math.sqrt(n)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("give_masks", [True, False], ids=["masks", "no_masks"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mixed_batches_fp32(layout, give_masks, alibi, op):
    heads, kv_heads = LAYOUTS[layout]
    seqs, num_blocks = make_seqs(MIXED, heads, kv_heads, torch.float32, seed=1)
    steps = schedule(MIXED)
    # the schedule really has what the test claims to cover
    assert any(n == 1 for s in steps for *_, n in s) and any(n > 1 for s in steps for *_, n in s)
    assert any({n == 1 for *_, n in s} == {True, False} for s in steps)  # decodes mixed with prefills
    assert any(n > 1 and start > 0 for s in steps for _, start, n in s)  # chunked prefill
    assert any(len(s) == 1 and s[0][2] == 1 for s in steps)  # a lone decode
    slopes = alibi_slopes(heads) if alibi else None
    cache = garbage_cache(num_blocks, kv_heads, torch.float32, False, 2)
    outs, _ = run(seqs, MIXED, cache, give_masks, slopes, op=OPS[op])
    for seq, out in zip(seqs, outs, strict=True):
        # fp32 op vs float64 reference over <= 13 keys: only fp32 rounding (~1e-7 relative) separates them
        torch.testing.assert_close(out.double(), reference(seq, slopes=slopes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("give_masks", [True, False], ids=["masks", "no_masks"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_prefix_lm_bidirectional(layout, give_masks, op):
    heads, kv_heads = LAYOUTS[layout]
    seqs, num_blocks = make_seqs(PREFIX_LM, heads, kv_heads, torch.float32, seed=3)
    cache = garbage_cache(num_blocks, kv_heads, torch.float32, False, 4)
    outs, _ = run(seqs, PREFIX_LM, cache, give_masks, op=OPS[op])
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq), rtol=1e-5, atol=1e-5)
    # not vacuous: the first prompt's queries do see later keys of the bidirectional part
    seq = dataclasses.replace(seqs[0], bidir=0)
    assert (outs[0][:4].double() - reference(seq)[:4]).abs().max() > 1e-2


@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("give_masks", [True, False], ids=["masks", "no_masks"])
def test_int8_kv_cache(give_masks, alibi):
    heads, kv_heads = LAYOUTS["gqa"]
    seqs, num_blocks = make_seqs(MIXED, heads, kv_heads, torch.float32, seed=5)
    slopes = alibi_slopes(heads) if alibi else None
    outs, own = run(seqs, MIXED, garbage_cache(num_blocks, kv_heads, torch.float32, True, 6), give_masks, slopes)
    worst = 0.0
    for seq, out, own_kv in zip(seqs, outs, own, strict=True):
        rot = hadamard(D)
        kq, vq = quant_dequant(seq.k @ rot) @ rot.T, quant_dequant(seq.v)
        exact = reference(seq, slopes=slopes)
        # Queries of a prefill chunk starting at 0 attend to their own unquantized K/V, every other read sees the
        # int8 values: choosing the reference per query this way leaves only fp32 rounding, hence 1e-5.
        mixed = torch.where(own_kv[:, None, None], exact, reference(seq, kq, vq, slopes))
        torch.testing.assert_close(out.double(), mixed, rtol=1e-5, atol=1e-5)
        # Against the unquantized reference: each element of V and of the rotated keys k R moves by at most s/2
        # (s = amax / 127 of its token and head), so each score q.k = (q R).(k R) by at most
        # delta = scale * |q R|_1 * max s_k / 2, each probability by a factor within exp(+-2 delta), and the output
        # by (exp(2 delta) - 1) * max|v| + max s_v / 2.
        s_k = (seq.k @ rot).abs().amax(-1).repeat_interleave(heads // kv_heads, dim=1).amax(0) / 127  # [H]
        s_v = seq.v.abs().amax(-1).repeat_interleave(heads // kv_heads, dim=1).amax(0) / 127
        v_max = seq.v.abs().repeat_interleave(heads // kv_heads, dim=1).amax(0)  # [H, D]
        delta = SCALE * (seq.q @ rot).abs().sum(-1) * s_k / 2  # [L, H]
        bound = torch.expm1(2 * delta)[..., None] * v_max + s_v[:, None] / 2 + 1e-5
        err = (out.double() - exact).abs()
        assert (err <= bound).all(), f"int8 error {err.max():.3g} above the derived bound"
        worst = max(worst, err.max().item())
    assert worst > 1e-4  # the cache really quantized (a float cache would match the exact reference)


@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
def test_bfloat16(alibi):
    heads, kv_heads = LAYOUTS["gqa"]
    seqs, num_blocks = make_seqs(MIXED, heads, kv_heads, torch.bfloat16, seed=7)
    slopes = alibi_slopes(heads) if alibi else None
    outs, _ = run(seqs, MIXED, garbage_cache(num_blocks, kv_heads, torch.bfloat16, False, 8), True, slopes)
    for seq, out in zip(seqs, outs, strict=True):
        ref = reference(seq, slopes=slopes)  # float64 on the same bf16-rounded inputs: input rounding cancels
        # bf16 keeps 8 significant bits (unit roundoff u = 2^-8). Rounding the output to bf16 costs <= u * |out|
        # (rtol). Scores and probabilities rounded to bf16 inside SDPA each move a probability by a relative ~u,
        # i.e. the output by <= u * max|v| each: atol = 2u * max|v| (~0.02 here; observed <= 0.007). The mask is
        # cast to bf16 too, but these ALiBi slopes are powers of two, so slope * (j - i) stays exact.
        atol = 2 * 2**-8 * seq.v.double().abs().max().item()
        torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=atol)


def _drop_causality(meta: AttnMetadata) -> AttnMetadata:
    chunks = [
        dataclasses.replace(c, mask=torch.zeros(1, 1, c.q_len, c.start_pos + c.q_len)) if c.start_pos else c
        for c in meta.prefills
    ]
    return dataclasses.replace(meta, prefills=tuple(chunks))


def _show_decode_padding(meta: AttnMetadata) -> AttnMetadata:
    mask = meta.decode_mask
    return meta if mask is None else dataclasses.replace(meta, decode_mask=torch.zeros_like(mask))


@pytest.mark.parametrize("tamper", [_drop_causality, _show_decode_padding], ids=["no_causality", "decode_padding"])
def test_wrong_mask_is_caught(tamper):
    """The reference and tolerances can fail: a wrong mask handed to the op must show up as a mismatch."""
    heads, kv_heads = LAYOUTS["gqa"]
    seqs, num_blocks = make_seqs(MIXED, heads, kv_heads, torch.float32, seed=9)
    cache = garbage_cache(num_blocks, kv_heads, torch.float32, False, 10)
    outs, _ = run(seqs, MIXED, cache, True, None, tamper)
    worst = max((out.double() - reference(seq)).abs().max().item() for seq, out in zip(seqs, outs, strict=True))
    assert worst > 1e-2
