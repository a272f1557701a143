"""LLMEngine on its own, with a scripted model (rtp_mm_testing/fake_engine.py): admission (the first output of every
request, rejections that name the problem, the prompt processor), the stop rules (EOS, min_new_tokens, stop token
sequences, length, timeout), aborts wherever a request is, the encode stage inside the step, and a runner fault that
fails the requests in flight but leaves the engine serving. Every case ends with every KV block free again."""

from __future__ import annotations

import re
import time

import pytest
import torch

from rtp_mm.errors import EmptyPromptError, InvalidRequest, PromptTooLongError, RtpMmError
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.engine import LLMEngine, ModelLimits, RequestOutput
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.multimodal import EncoderInput, EncodeStage, ImageEncoder, MultimodalInput, PreparedPrompt
from rtp_mm.llm.engine.request import EngineRequest
from rtp_mm.llm.engine.scheduler import Scheduler
from rtp_mm.llm.models.prefix_lm import PrefixLM
from rtp_mm_testing.fake_engine import VOCAB, FakeModel

EOS = 2
IMAGE = 7  # the fake image placeholder id; one image becomes ROWS rows
ROWS = 3


def make_engine(tokens=None, blocks=32, budget=64, max_seq_len=64, processor=None, encoder=None, prefix_lm=None):
    bm = BlockManager(blocks, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, watermark_blocks=0)
    limits = ModelLimits(vocab_size=VOCAB, max_seq_len=max_seq_len, prefix_lm=prefix_lm)
    stage = None if encoder is None else EncodeStage(encoder)
    model = FakeModel(tokens)
    engine = LLMEngine(
        model, sched, limits, eos_token_ids=frozenset({EOS}), prompt_processor=processor, encode_stage=stage
    )
    return engine, model


def submit(engine: LLMEngine, request_id: int, prompt, images=(), arrival=None, **config) -> list[RequestOutput]:
    cfg = GenerateConfig(**{"max_new_tokens": 4, "top_k": 1, **config})
    extra = {} if arrival is None else {"arrival_time": arrival}
    return engine.add(EngineRequest(request_id, prompt, cfg, tuple(images), **extra))


def drain(engine: LLMEngine, max_steps: int = 200) -> dict[int, RequestOutput]:
    """Step until idle; the final output of every request."""
    finals: dict[int, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
            return finals
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    raise AssertionError("the engine made no progress")


# ---- admission ----------------------------------------------------------------------------------------------------
def test_the_first_output_is_the_admission_then_one_per_token():
    engine, _ = make_engine(tokens={1: [5, 6, 7, 8]})
    (accepted,) = submit(engine, 1, [5, 6, 7])
    assert accepted.accepted and not accepted.finished and accepted.token_ids == [] and accepted.error is None
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert [o.num_new_tokens for o in outs] == [1, 1, 1, 1] and not any(o.accepted for o in outs)
    assert outs[-1].token_ids == [5, 6, 7, 8] and outs[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "config", "error", "message"),
    [
        ([], {}, EmptyPromptError, "prompt is empty"),
        ([1] * 64, {}, PromptTooLongError, "prompt length 64 >= max_seq_len 64"),
        ([1, VOCAB, -3], {}, InvalidRequest, r"\[32000, -3\] are outside the vocabulary"),
        ([1, 2], {"eos_token_id": VOCAB + 1}, InvalidRequest, "eos_token_id=32001 is outside"),
        ([1, 2], {"max_new_tokens": -1}, RtpMmError, "max_new_tokens"),
        ("text", {}, InvalidRequest, "takes token ids only"),
    ],
)
def test_a_rejected_request_gets_one_finished_error_output(prompt, config, error, message):
    engine, _ = make_engine()
    (out,) = submit(engine, 1, prompt, **config)
    assert out.finished and out.finish_reason == "error" and isinstance(out.error, error)
    assert re.search(message, out.error.message), out.error.message
    assert not engine.has_work and engine.requests == {}


def test_a_prompt_over_the_whole_cache_is_refused():
    engine, _ = make_engine(blocks=2, max_seq_len=1000)  # 2 blocks of 4 tokens
    (out,) = submit(engine, 1, [1] * 8)
    assert isinstance(out.error, PromptTooLongError) and "needs 3 KV blocks; the cache has only 2" in out.error.message


def test_the_prompt_processor_turns_submitted_prompts_into_ids_and_its_faults_stay_with_the_request():
    def processor(prompt, num_images):
        if prompt == "boom":
            raise TypeError("a tokenizer bug")
        return [ord(c) for c in prompt]

    engine, _ = make_engine(processor=processor)
    (ok,) = submit(engine, 1, "hi")
    (bad,) = submit(engine, 2, "boom")
    assert ok.accepted and engine.requests[1].prompt_ids == [ord("h"), ord("i")]
    assert bad.finished and "a tokenizer bug" in bad.error.message
    assert list(drain(engine)) == [1]


def test_prefix_lm_layout_and_its_limits():
    glm = PrefixLM(sop_id=9, mask_ids=(8,), gmask_id=8, two_d=True)
    engine, model = make_engine(prefix_lm=glm, budget=6)
    (out,) = submit(engine, 1, [1, 2, 3])
    assert "<sop>" in out.error.message
    (out,) = submit(engine, 2, [1, 2, 8, 3, 4, 5, 9])  # 7 tokens > budget 6: cannot be prefilled in one step
    assert isinstance(out.error, PromptTooLongError) and "MAX_NUM_BATCHED_TOKENS" in out.error.message
    (out,) = submit(engine, 3, [1, 8, 9])
    assert out.accepted and engine.requests[3].layout.bidirectional_len == 2
    drain(engine)
    (prefill,) = model.batches[0].prefills
    assert prefill.positions == ((0, 0), (1, 0), (1, 1)) and prefill.bidirectional_len == 2


# ---- stop rules ---------------------------------------------------------------------------------------------------
def test_eos_ends_a_request_after_min_new_tokens_only():
    engine, _ = make_engine(tokens={1: [EOS, 5, EOS, 6], 2: [EOS, 5, EOS, 6]})
    submit(engine, 1, [3, 4], max_new_tokens=4)
    submit(engine, 2, [3, 4], max_new_tokens=4, min_new_tokens=2)
    finals = drain(engine)
    assert (finals[1].token_ids, finals[1].finish_reason) == ([EOS], "stop")
    assert (finals[2].token_ids, finals[2].finish_reason) == ([EOS, 5, EOS], "stop")


def test_stop_token_sequences_length_and_ignore_eos():
    engine, _ = make_engine(tokens={1: [5, 6, 7, 8], 2: [EOS, EOS, EOS, EOS]})
    submit(engine, 1, [3], stop_words_list=[[6, 7]])
    submit(engine, 2, [3], ignore_eos=True, max_new_tokens=3)
    finals = drain(engine)
    assert (finals[1].token_ids, finals[1].finish_reason) == ([5, 6, 7], "stop")
    assert (finals[2].token_ids, finals[2].finish_reason) == ([EOS] * 3, "length")


def test_max_seq_len_caps_generation():
    engine, _ = make_engine(max_seq_len=6)
    submit(engine, 1, [3, 4, 5, 6], max_new_tokens=100, ignore_eos=True)
    out = drain(engine)[1]
    assert out.finish_reason == "length" and len(out.token_ids) == 2 and out.aux_info["input_len"] == 4


def test_a_timed_out_request_fails_with_its_blocks_released():
    engine, _ = make_engine()
    submit(engine, 1, [3, 4], timeout_ms=50, arrival=time.monotonic() - 1.0, max_new_tokens=50, ignore_eos=True)
    submit(engine, 2, [3, 4], max_new_tokens=3, ignore_eos=True)
    finals = drain(engine)
    assert finals[1].finish_reason == "error" and "timeout" in finals[1].error.message
    assert finals[2].finish_reason == "length"


# ---- aborts and faults --------------------------------------------------------------------------------------------
def test_abort_wherever_the_request_is():
    engine, _ = make_engine(budget=4)
    submit(engine, 1, [3] * 10, max_new_tokens=20, ignore_eos=True)  # running, prefilled in chunks
    submit(engine, 2, [3, 4], max_new_tokens=20, ignore_eos=True)  # waiting
    engine.step()
    assert engine.abort(1) and engine.abort(2) and not engine.abort(3)
    assert not engine.has_work and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_runner_fault_fails_the_requests_in_flight_and_the_engine_goes_on():
    engine, model = make_engine()
    submit(engine, 1, [3, 4], max_new_tokens=8, ignore_eos=True)
    model.fail = RuntimeError("device lost")
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    (failed,) = engine.fail_all(RtpMmError("engine step failed"))  # what EngineLoop does with the fault
    assert failed.finished and failed.error.message == "engine step failed"
    submit(engine, 2, [3, 4], max_new_tokens=2, ignore_eos=True)
    assert drain(engine)[2].finish_reason == "length"


# ---- the encode stage inside the step -----------------------------------------------------------------------------
def fake_encoder() -> tuple[ImageEncoder, list[int]]:
    calls: list[int] = []

    def encode(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(pixels))
        return [p.expand(ROWS, 4).clone() for p in pixels]

    def expand(ids: list[int], rows: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        spots = [i for i, t in enumerate(ids) if t == IMAGE]
        if len(spots) != len(rows):
            raise InvalidRequest(f"{len(spots)} placeholders, {len(rows)} images")
        out, mm, last = [], [], 0
        for spot, r, h in zip(spots, rows, hashes, strict=True):
            out += ids[last:spot]
            mm.append(MultimodalInput(r, len(out), h))
            out += [IMAGE] * ROWS
            last = spot + 1
        return PreparedPrompt(out + ids[last:], mm)

    return ImageEncoder(encode, expand, max_batch=2), calls


def image(value: float) -> EncoderInput:
    return EncoderInput(torch.full((1, 4), value), f"img{value}")


def test_images_are_encoded_in_the_step_then_admitted_with_their_rows():
    encoder, calls = fake_encoder()
    engine, model = make_engine(encoder=encoder)
    assert submit(engine, 1, [1, IMAGE, 2], [image(1)]) == []  # no admission before its image is encoded
    assert submit(engine, 2, [IMAGE, IMAGE], [image(2), image(1)]) == []
    (out,) = submit(engine, 3, [1, IMAGE])  # a placeholder without its image fails at once
    assert "1 placeholders, 0 images" in out.error.message
    outs = engine.step()
    assert calls == [2] and sorted(o.request_id for o in outs if o.accepted) == [1, 2]
    assert engine.requests[1].prompt_ids == [1, IMAGE, IMAGE, IMAGE, 2]
    assert [m.offset for m in engine.requests[2].mm_inputs] == [0, ROWS]
    (prefill,) = [p for p in model.batches[0].prefills if p.request_id == 1]
    assert [m.content_hash for m in prefill.mm_inputs] == ["img1"]
    drain(engine)


def test_images_for_a_text_only_engine_and_aborts_while_encoding():
    engine, _ = make_engine()
    (out,) = submit(engine, 1, [IMAGE], [image(1)])
    assert "no vision encoder" in out.error.message
    encoder, calls = fake_encoder()
    engine, _ = make_engine(encoder=encoder)
    submit(engine, 2, [IMAGE], [image(1)])
    assert engine.has_work and engine.abort(2) and not engine.has_work
    engine.step()
    assert calls == []
    submit(engine, 3, [IMAGE], [image(1)])
    (failed,) = engine.fail_all(RtpMmError("shutting down"))
    assert failed.request_id == 3 and failed.finished and not engine.has_work
