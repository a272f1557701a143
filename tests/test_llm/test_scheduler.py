"""The scheduler inside the real engine step: admission order, token budget, chunked prefill, concurrency limit,
preemption by recompute, block accounting under a random workload, and prefix-cache reuse.

Each test drives ``LLMEngine.step`` (schedule, run, advance, append, finish) over a real Scheduler and BlockManager;
only the model is replaced, by ``FakeModel``: one deterministic token per sampled sequence. Every batch is checked
against invariants computed independently from the request state before the step (see ``check_batch``).
"""

from __future__ import annotations

import math
import random

import pytest

from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.engine import LLMEngine, ModelLimits
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.request import EngineRequest, Request, RequestStatus
from rtp_mm.llm.engine.scheduler import ScheduledBatch, Scheduler
from rtp_mm_testing.fake_engine import VOCAB, FakeModel


class Harness:
    """A real LLMEngine over a real Scheduler and BlockManager; ``step`` is one ``engine.step()``."""

    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, budget=32, watermark=0, caching=False):
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, watermark_blocks=watermark)
        self.model = FakeModel()
        self.engine = LLMEngine(self.model, self.sched, ModelLimits(vocab_size=VOCAB, max_seq_len=1 << 30))
        schedule = self.sched.schedule
        self._before: dict[int, tuple[int, int]] = {}
        self.last: ScheduledBatch | None = None

        def checked_schedule() -> ScheduledBatch:
            batch = schedule()
            check_batch(self.sched, batch, self._before)
            self.last = batch
            return batch

        self.sched.schedule = checked_schedule

    def add(self, request_id: int, prompt_len: int, max_new: int, prompt: list[int] | None = None) -> Request:
        # Distinct ids per request so that prefix caching (when on) only hits where a test shares a prefix on purpose.
        ids = (
            prompt if prompt is not None else [1 + (request_id * 7919 + i * 104729) % 30000 for i in range(prompt_len)]
        )
        config = GenerateConfig(max_new_tokens=max_new, ignore_eos=True)
        (admission,) = self.engine.add(EngineRequest(request_id, ids, config))
        assert admission.accepted, admission.error
        return self.engine.requests[request_id]

    def cancel(self, req: Request) -> None:
        self.engine.abort(req.request_id)

    def step(self, on_scheduled=None) -> ScheduledBatch:
        self._before = snapshot(self.sched)
        self.model.on_scheduled = on_scheduled
        self.engine.step()
        assert self.last is not None
        return self.last

    def run_to_completion(self, max_steps: int = 10_000) -> list[ScheduledBatch]:
        batches = []
        while self.sched.has_work:
            assert len(batches) < max_steps, "scheduler made no progress"
            batches.append(self.step())
            assert batches[-1].seqs or batches[-1].preempted, "a step with work scheduled nothing"
        return batches


def snapshot(sched: Scheduler) -> dict[int, tuple[int, int]]:
    """request_id -> (num_computed_tokens, num_tokens) of every live request, taken before schedule()."""
    return {r.request_id: (r.num_computed_tokens, r.num_tokens) for r in [*sched.waiting, *sched.running]}


def check_batch(sched: Scheduler, batch: ScheduledBatch, before: dict[int, tuple[int, int]]) -> None:
    bm = sched.block_manager
    bs = bm.block_size
    live = {r.request_id: r for r in [*sched.waiting, *sched.running]}
    assert sum(s.num_new_tokens for s in batch.seqs) == batch.num_tokens <= sched.max_num_batched_tokens
    assert len({s.request_id for s in batch.seqs}) == len(batch.seqs)  # one entry per request
    assert len(sched.running) <= sched.max_num_seqs
    for seq in batch.decodes:
        assert seq.num_new_tokens == 1
    for seq in batch.prefills:
        assert seq.num_new_tokens > 1
    for seq in batch.seqs:
        req = live[seq.request_id]
        computed, total = before[req.request_id]
        assert req.status is RequestStatus.RUNNING
        # Either continue where it was, or (fresh admission / recompute) start at 0 or at a prefix-cache boundary.
        assert seq.start == computed or (computed == 0 and seq.start % bs == 0 and seq.start < total)
        assert 1 <= seq.num_new_tokens <= total - seq.start
        assert seq.sample == (seq.start + seq.num_new_tokens == total)
        assert seq.token_ids == tuple(req.all_token_ids[seq.start : seq.start + seq.num_new_tokens])
        assert len(seq.block_table) == math.ceil((seq.start + seq.num_new_tokens) / bs)
        assert tuple(req.block_table) == seq.block_table
    for request_id in batch.preempted:
        req = live[request_id]
        assert req.status is RequestStatus.WAITING and req.block_table == [] and req.num_computed_tokens == 0
    check_blocks(sched)


def check_blocks(sched: Scheduler) -> None:
    """Every block's ref count equals the number of running block tables holding it; waiting requests hold none."""
    bm = sched.block_manager
    holders = [0] * bm.num_blocks
    for req in sched.running:
        assert req.status is RequestStatus.RUNNING
        for block_id in req.block_table:
            holders[block_id] += 1
    for req in sched.waiting:
        assert req.status is RequestStatus.WAITING and req.block_table == []
    assert [b.ref_count for b in bm.blocks] == holders
    assert bm.num_free_blocks == holders.count(0)
    if not bm.enable_prefix_caching:
        assert sum(len(r.block_table) for r in sched.running) + bm.num_free_blocks == bm.num_blocks


def first_scheduled(batches: list[ScheduledBatch]) -> list[int]:
    order: list[int] = []
    for batch in batches:
        for seq in batch.seqs:
            if seq.request_id not in order:
                order.append(seq.request_id)
    return order


# ---- admission ----------------------------------------------------------------------------------------------------
def test_fifo_admission_order_under_a_concurrency_limit():
    h = Harness(max_num_seqs=2, budget=64)
    # Different lengths make requests finish out of order; admission must still follow arrival order.
    specs = [(5, 9), (3, 2), (7, 4), (2, 1), (6, 6), (4, 3)]
    reqs = [h.add(i, p, n) for i, (p, n) in enumerate(specs)]
    batches = h.run_to_completion()
    assert first_scheduled(batches) == list(range(len(reqs)))
    for req in reqs:
        assert req.finish_reason == "length" and req.num_tokens == req.max_total_len
    assert max(len(b.seqs) for b in batches) == 2


def test_max_num_seqs_is_respected():
    h = Harness(max_num_seqs=3, budget=64)
    reqs = [h.add(i, 3 + i % 4, 5 + i % 3) for i in range(10)]
    batches = []
    while h.sched.has_work:
        batches.append(h.step())
        assert len(h.sched.running) <= 3
        assert len(batches[-1].seqs) <= 3
    assert max(len(b.seqs) for b in batches) == 3  # the limit was actually reached
    assert all(r.finish_reason == "length" for r in reqs)


def test_token_budget_is_respected_every_step():
    h = Harness(num_blocks=200, max_num_seqs=16, budget=16)
    rng = random.Random(1)
    for i in range(30):
        h.add(i, rng.randint(1, 40), rng.randint(1, 10))
    batches = h.run_to_completion()
    assert all(b.num_tokens <= 16 for b in batches)
    assert max(b.num_tokens for b in batches) == 16


def test_chunked_prefill_of_a_long_prompt():
    h = Harness(budget=8)
    req = h.add(0, 30, 3)
    chunks = []
    for _ in range(4):
        (seq,) = h.step().seqs
        chunks.append((seq.start, seq.num_new_tokens, seq.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert len(req.output_ids) == 1 and req.num_computed_tokens == 30
    (seq,) = h.step().decodes
    assert (seq.start, seq.num_new_tokens, seq.sample) == (30, 1, True)


def test_decodes_are_scheduled_before_new_prefills():
    h = Harness(budget=6, max_num_seqs=8)
    old = [h.add(i, 2, 20) for i in range(3)]
    h.step()  # the three short prompts fit in one step
    assert all(len(r.output_ids) == 1 for r in old)
    new = h.add(10, 20, 2)
    for _ in range(3):
        batch = h.step()
        # Every running decode gets its token; the new prompt only gets what is left of the budget.
        assert [s.request_id for s in batch.decodes] == [0, 1, 2]
        (chunk,) = batch.prefills
        assert chunk.request_id == new.request_id and chunk.num_new_tokens == 3
    assert new.num_computed_tokens == 9


def test_running_partial_prefill_continues_before_admitting_more():
    h = Harness(budget=8, max_num_seqs=8)
    h.add(0, 20, 2)
    h.add(1, 3, 2)
    ids = [[s.request_id for s in h.step().seqs] for _ in range(3)]
    # long takes the whole budget until its last chunk (4 tokens); short is then admitted with the remainder.
    assert ids == [[0], [0], [0, 1]]


# ---- preemption ---------------------------------------------------------------------------------------------------
def test_preemption_sends_the_newest_to_the_front_and_it_resumes():
    # 6 blocks of 4 tokens. a: 8 + 12 = 20 tokens (5 blocks), b: 8 + 8 = 16 (4 blocks); together they cannot fit.
    h = Harness(num_blocks=6, block_size=4, max_num_seqs=2, budget=64, watermark=0)
    a, b, c = h.add(0, 8, 12), h.add(1, 8, 8), h.add(2, 3, 2)
    h.step()  # prefill a and b (2 blocks each); c waits on max_num_seqs
    assert [r.request_id for r in h.sched.running] == [0, 1] and list(h.sched.waiting) == [c]

    preempted_at = None
    for _ in range(20):
        batch = h.step()
        if batch.preempted:
            preempted_at = batch
            break
    assert preempted_at is not None
    # Both reach 13 tokens together (4th block each) with only 6 blocks: b (newest) goes, a keeps running.
    assert preempted_at.preempted == (b.request_id,)
    assert [s.request_id for s in preempted_at.seqs] == [a.request_id]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and b.num_tokens == 13
    assert list(h.sched.waiting) == [b, c]  # the FRONT of the queue
    assert h.sched.running == [a]

    resumed = []
    while h.sched.has_work:
        batch = h.step()
        resumed += [s for s in batch.seqs if s.request_id == b.request_id]
    # b comes back before c and recomputes everything it had (13 tokens) in one prefill, then samples.
    assert (resumed[0].start, resumed[0].num_new_tokens, resumed[0].sample) == (0, 13, True)
    assert a.num_tokens == a.max_total_len == 20 and len(a.output_ids) == 12
    assert b.num_tokens == b.max_total_len == 16 and len(b.output_ids) == 8
    assert c.finish_reason == "length"
    assert b.reuse_len == 0
    assert h.sched.block_manager.num_free_blocks == 6


def test_preemption_takes_the_newest_requests_first():
    h = Harness(num_blocks=6, block_size=4, max_num_seqs=3, budget=64, watermark=0)
    reqs = [h.add(i, 4, 8) for i in range(3)]  # 3 x 2 blocks once decoding starts
    h.step()
    preempted = []
    while not preempted:
        preempted = list(h.step().preempted)
    assert preempted == [reqs[2].request_id]
    assert h.sched.waiting[0] is reqs[2]


# ---- block accounting under a random workload ---------------------------------------------------------------------
@pytest.mark.parametrize("caching", [False, True])
def test_random_workload_returns_every_block(caching):
    rng = random.Random(1234)
    num_blocks, bs = 48, 4
    h = Harness(num_blocks=num_blocks, block_size=bs, max_num_seqs=8, budget=32, watermark=1, caching=caching)
    sched = h.sched
    shared = [[rng.randint(1, 30000) for _ in range(24)] for _ in range(4)]  # common system prompts
    pending = []
    for i in range(200):
        prompt_len, max_new = rng.randint(1, 60), rng.randint(1, 40)
        prompt = None
        if caching and rng.random() < 0.5:
            prompt = rng.choice(shared)[: rng.randint(1, 24)] + [rng.randint(1, 30000) for _ in range(prompt_len)]
        assert math.ceil((prompt_len + max_new + 24) / bs) <= num_blocks  # every request fits the cache alone
        pending.append((i, prompt_len, max_new, prompt))
    pending.reverse()
    reqs: list[Request] = []
    cancelled_while = {"waiting": 0, "running": 0, "in_flight": 0}

    def cancel_in_flight(batch):
        if batch.seqs and rng.random() < 0.02:
            h.engine.abort(rng.choice(batch.seqs).request_id)  # finished while its token is being computed
            cancelled_while["in_flight"] += 1

    steps = 0
    while pending or sched.has_work:
        steps += 1
        assert steps < 20_000, "no progress"
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if pending:
                reqs.append(h.add(*pending.pop()))
        if rng.random() < 0.05 and (sched.waiting or sched.running):
            req = rng.choice([*sched.waiting, *sched.running])
            cancelled_while[req.status.value] += 1
            assert h.engine.abort(req.request_id, "cancelled")
            assert not h.engine.abort(req.request_id, "length")  # gone: the first reason stays
        h.step(cancel_in_flight)
        check_blocks(sched)

    assert sched.block_manager.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in sched.block_manager.blocks)
    finished = [r for r in reqs if r.finish_reason == "length"]
    cancelled = [r for r in reqs if r.finish_reason == "cancelled"]
    assert len(finished) + len(cancelled) == 200
    assert all(r.is_finished for r in reqs)
    assert all(r.num_tokens == r.max_total_len for r in finished)
    assert all(r.num_tokens <= r.max_total_len for r in cancelled)
    # The workload really exercised the paths under test.
    assert all(cancelled_while.values()), cancelled_while
    assert sum(r.num_preemptions for r in reqs) > 0
    if caching:
        assert sched.block_manager.stats.prefix_hit_tokens > 0
    assert sched.block_manager.stats.per_request_hashes == {}  # finish() drops the per-request memo
    assert h.engine.requests == {}  # the engine forgot every request


def test_cancel_removes_waiting_requests_and_is_idempotent():
    h = Harness(max_num_seqs=1)
    a, b = h.add(0, 4, 2), h.add(1, 4, 2)
    assert h.engine.abort(b.request_id, "cancelled")
    assert not h.engine.abort(b.request_id, "error")
    assert b.finish_reason == "cancelled" and list(h.sched.waiting) == [a]
    h.run_to_completion()
    assert a.finish_reason == "length" and b.output_ids == []


# ---- prefix caching -----------------------------------------------------------------------------------------------
def test_prefix_cache_reuse_for_a_shared_prefix():
    bs = 4
    common = list(range(100, 111))  # 11 shared tokens -> 2 full blocks
    a_prompt = common + [1, 2, 3]
    b_prompt = common + [7, 8, 9, 10, 11]  # 16 tokens -> 4 blocks

    def admit_b(caching: bool) -> tuple[int, Request, Request]:
        h = Harness(num_blocks=32, block_size=bs, budget=64, caching=caching)
        a = h.add(0, 0, 10, a_prompt)
        h.step()  # a is prefilled and its full blocks are published
        used = h.sched.block_manager.num_used_blocks
        b = h.add(1, 0, 4, b_prompt)
        batch = h.step()
        (b_seq,) = [s for s in batch.seqs if s.request_id == b.request_id]
        assert b_seq.start == b.reuse_len
        return h.sched.block_manager.num_used_blocks - used, a, b

    # a's decode in that step could also grow a; compare against the same schedule without caching.
    new_blocks_cached, a_cached, b_cached = admit_b(caching=True)
    new_blocks_plain, a_plain, b_plain = admit_b(caching=False)
    expected_reuse = (len(common) // bs) * bs
    assert b_cached.reuse_len == expected_reuse == 8
    assert b_plain.reuse_len == 0
    assert new_blocks_plain - new_blocks_cached == expected_reuse // bs
    assert b_cached.block_table[:2] == a_cached.block_table[:2]
    assert not set(b_plain.block_table) & set(a_plain.block_table)


def test_identical_prompt_still_computes_its_last_token():
    h = Harness(num_blocks=32, block_size=4, budget=64, caching=True)
    prompt = list(range(200, 212))  # exactly 3 blocks
    h.add(0, 0, 1, prompt)
    h.run_to_completion()
    b = h.add(1, 0, 1, list(prompt))
    (seq,) = h.step().seqs
    # Only 2 of the 3 cached blocks can be used: the last prompt token must run to produce logits.
    assert (b.reuse_len, seq.start, seq.num_new_tokens, seq.sample) == (8, 8, 4, True)
