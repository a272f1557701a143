"""EngineLoop with a scripted model: the engine is built on the loop's own thread, every sink runs there, requests
submitted together are admitted between the same two steps, ``call`` runs work between steps, a step fault fails
only the requests in flight, a broken sink does not stop the engine, and shutdown answers every request left."""

from __future__ import annotations

import threading
import time

import pytest

from rtp_mm.errors import EngineDead, RtpMmError
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.engine import LLMEngine, ModelLimits, RequestOutput
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.loop import EngineLoop
from rtp_mm.llm.engine.request import EngineRequest
from rtp_mm.llm.engine.scheduler import Scheduler
from rtp_mm_testing.fake_engine import VOCAB, FakeModel

ENGINE_THREAD = "rtp-mm-engine"


def build(model: FakeModel | None = None) -> LLMEngine:
    if model is None:  # 5 ms a step: a long request stays in flight for seconds
        model = FakeModel()
        model.on_scheduled = lambda batch: time.sleep(0.005)
    sched = Scheduler(BlockManager(1024, 4), max_num_seqs=8, max_num_batched_tokens=64, watermark_blocks=0)
    return LLMEngine(model, sched, ModelLimits(vocab_size=VOCAB, max_seq_len=4000))


def request(request_id: int, max_new_tokens: int = 3) -> EngineRequest:
    return EngineRequest(request_id, [5, 6], GenerateConfig(max_new_tokens=max_new_tokens, top_k=1, ignore_eos=True))


class Collector:
    """A sink that records every output and the thread it ran on; ``done`` when ``expected`` requests finished."""

    def __init__(self, expected: int = 1):
        self.outputs: list[RequestOutput] = []
        self.threads: set[str] = set()
        self.expected = expected
        self.done = threading.Event()

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        self.threads.add(threading.current_thread().name)
        if sum(o.finished for o in self.outputs) == self.expected:
            self.done.set()

    def finals(self) -> dict[int, RequestOutput]:
        return {o.request_id: o for o in self.outputs if o.finished}


@pytest.fixture
def loop():
    built_on: list[str] = []

    def factory() -> LLMEngine:
        built_on.append(threading.current_thread().name)
        return build()

    loop = EngineLoop(factory)
    assert built_on == [ENGINE_THREAD]  # loading, warm-up and stepping share one thread (one OpenMP team)
    yield loop
    loop.shutdown()


def test_a_build_error_is_raised_in_the_constructor():
    def factory() -> LLMEngine:
        raise RtpMmError("no such checkpoint")

    with pytest.raises(RtpMmError, match="no such checkpoint"):
        EngineLoop(factory)


def test_outputs_reach_the_sink_on_the_engine_thread_admission_first(loop):
    sink = Collector(expected=2)
    loop.submit([request(1), request(2)], sink)
    assert sink.done.wait(10)
    assert sink.threads == {ENGINE_THREAD}
    for request_id in (1, 2):
        mine = [o for o in sink.outputs if o.request_id == request_id]
        assert mine[0].accepted and [o.num_new_tokens for o in mine[1:]] == [1, 1, 1] and mine[-1].finished


def test_requests_submitted_together_are_admitted_between_the_same_two_steps():
    model = FakeModel()
    loop = EngineLoop(lambda: build(model))
    try:
        sink = Collector(expected=3)
        loop.submit([request(1), request(2), request(3)], sink)
        assert sink.done.wait(10)
        assert sorted(s.request_id for s in model.batches[0].seqs) == [1, 2, 3]  # one prefill step for all three
    finally:
        loop.shutdown()


def test_call_runs_between_steps_and_returns_or_raises(loop):
    assert loop.call(lambda engine: threading.current_thread().name) == ENGINE_THREAD
    assert loop.call(lambda engine: loop.call(lambda e: 42)) == 42  # from the engine thread: run directly
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda engine: 1 / 0)
    with pytest.raises(TimeoutError):
        loop.call(lambda engine: threading.Event().wait(1.0), timeout=0.1)


def test_abort_frees_the_request_at_once(loop):
    sink = Collector()
    loop.submit([request(1, max_new_tokens=10_000)], sink)
    while not any(o.num_new_tokens for o in sink.outputs):
        threading.Event().wait(0.01)
    loop.abort(1)
    stats = loop.call(lambda engine: engine.stats())
    assert stats["num_running"] == 0 and stats["free_blocks"] == stats["num_blocks"]
    assert not sink.done.is_set()  # a cancelled request gets no more outputs


def test_a_step_fault_fails_the_requests_in_flight_and_the_loop_survives():
    model = FakeModel()
    loop = EngineLoop(lambda: build(model))
    try:
        model.fail = RuntimeError("device lost")
        first = Collector()
        loop.submit([request(1)], first)
        assert first.done.wait(10)
        (out,) = first.finals().values()
        assert out.finish_reason == "error" and "device lost" in out.error.message
        second = Collector()
        loop.submit([request(2)], second)
        assert second.done.wait(10) and second.finals()[2].finish_reason == "length"
    finally:
        loop.shutdown()


def test_a_broken_sink_does_not_stop_the_engine(loop):
    def broken(out: RequestOutput) -> None:
        raise ValueError("consumer bug")

    loop.submit([request(1)], broken)
    sink = Collector()
    loop.submit([request(2)], sink)
    assert sink.done.wait(10) and loop.alive


def test_shutdown_answers_every_request_left_and_refuses_new_work():
    loop = EngineLoop(lambda: build())
    sink = Collector()
    loop.submit([request(1, max_new_tokens=10_000)], sink)
    while not sink.outputs:
        threading.Event().wait(0.01)
    loop.shutdown()
    assert sink.done.wait(10) and isinstance(sink.finals()[1].error, EngineDead)
    assert not loop.alive
    with pytest.raises(EngineDead):
        loop.submit([request(2)], Collector())
    with pytest.raises(EngineDead):
        loop.call(lambda engine: None)
