"""Vision as an engine stage, end to end through LLM: the images of concurrent requests encoded in one ViT batch
on the engine thread (a shared image once), preprocessing on the callers' threads, and the encoder counters in
``LLM.stats()``. Oracle for outputs: the same requests run one at a time on a separate engine. The stage itself is
unit-tested in tests/test_llm/test_encode_stage.py."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm_testing.fake_vision import MODEL_TYPE, ROWS, engine_paused, make_checkpoint, picture, registered
from rtp_mm_testing.oracle import tiny_llm

HIDDEN = 64
CFG = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with registered():
        path = tmp_path_factory.mktemp("fake_vision_stage")
        _, image_id = make_checkpoint(path, seed=12)
        yield path, image_id


def _prompts(image_id: int) -> list[list[int]]:
    return [[1, *range(10, 10 + n), image_id, *range(50, 50 + n % 3)] for n in (2, 5, 3, 7, 1, 4)]


def test_six_concurrent_requests_batch_the_vit_and_match_each_alone(ckpt):
    path, image_id = ckpt
    prompts = _prompts(image_id)
    images = [picture(s) for s in (1, 2, 3, 1, 4, 1)]  # image 1 shared by three requests
    with registered():
        llm, alone_llm = tiny_llm(path, MODEL_TYPE), tiny_llm(path, MODEL_TYPE)
    try:
        fake = llm.vision
        requests: dict[int, object] = {}

        def prepare(i: int) -> None:  # preprocessing runs on the caller's thread
            requests[i] = llm.make_request(prompts[i], CFG, [images[i]])

        threads = [threading.Thread(target=prepare, args=(i,), name=f"caller-{i}") for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finals: dict[int, object] = {}
        done = threading.Event()

        def sink(out) -> None:
            if out.finished:
                finals[out.request_id] = out
                if len(finals) == len(prompts):
                    done.set()

        with engine_paused(llm.client):  # six separate submissions, admitted between the same two steps
            for i in range(len(prompts)):
                llm.client.submit(requests[i], sink)
        assert done.wait(60)
        results = {i: finals[requests[i].request_id].token_ids for i in range(len(prompts))}
        pairs = zip(prompts, images, strict=True)
        alone = [alone_llm.generate([p], CFG, images=[[im]])[0].token_ids for p, im in pairs]
        assert [results[i] for i in range(len(prompts))] == alone
        stats = llm.stats()
        assert stats["vision_images_encoded"] == stats["vision_cache_misses"] == 4  # the shared image: once
        assert stats["vision_cache_hits"] == 2
        assert fake.batch_sizes == [4] and stats["vision_encode_batches"] == 1  # one ViT batch for the burst
        assert stats["vision_cache_entries"] == 4 and stats["vision_cache_bytes"] == 4 * ROWS * HIDDEN * 4
        assert set(fake.encode_threads) == {"rtp-mm-engine"}  # encoding is an engine stage
        assert {n for n in fake.preprocess_threads} == {f"caller-{i}" for i in range(6)}  # preprocessing is not
    finally:
        llm.shutdown()
        alone_llm.shutdown()


def test_one_generate_call_encodes_its_prompts_images_together(ckpt):
    path, image_id = ckpt
    prompts = _prompts(image_id)[:3]
    images = [[picture(20)], [picture(21)], [picture(22)]]
    with registered():
        llm = tiny_llm(path, MODEL_TYPE)
    try:
        outs = llm.generate(prompts, CFG, images=images)  # one submission: admitted between the same two steps
        assert llm.vision.batch_sizes == [3]
        alone = [llm.generate([p], CFG, images=[im])[0].token_ids for p, im in zip(prompts, images, strict=True)]
        assert [o.token_ids for o in outs] == alone
    finally:
        llm.shutdown()


def test_a_running_request_keeps_decoding_while_a_burst_of_images_is_encoded(ckpt):
    """Encoding is scheduled like prefill: one batch of at most max_batch images per step, between decode steps."""
    path, image_id = ckpt
    with registered():
        llm = tiny_llm(path, MODEL_TYPE)
    try:
        text = llm.make_request([1, 2, 3], GenerateConfig(max_new_tokens=40, top_k=1, ignore_eos=True))
        burst = [llm.make_request(p, CFG, [picture(30 + i)]) for i, p in enumerate(_prompts(image_id))]
        log: list[tuple[int, int]] = []  # after each engine step: (images encoded, tokens of the text request)

        def trace_steps(engine) -> None:
            engine.encode_stage.encoder = dataclasses.replace(engine.encode_stage.encoder, max_batch=1)
            step = engine.step

            def traced():
                outs = step()
                req = engine.requests.get(text.request_id)
                log.append((engine.encode_stage.stats.images_encoded, len(req.output_ids) if req else -1))
                return outs

            engine.step = traced

        llm.client.call(trace_steps)
        outs = llm.client.run([text, *burst])
        assert len(outs[0].token_ids) == 40
        during = [tokens for encoded, tokens in log if 0 < encoded < len(burst)]
        assert len(during) == len(burst) - 1 and during == sorted(set(during))  # a text token in every such step
    finally:
        llm.shutdown()


def test_normalize_pixels_is_torch_exact_and_starts_no_openmp_team():
    import os

    import numpy as np
    from PIL import Image

    from rtp_mm.vision.base import CLIP_MEAN, CLIP_STD, normalize_pixels

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    want = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    box: list = []

    def pool_thread() -> None:  # counted while the thread lives: a dead thread's OpenMP team goes with it
        before = tasks()
        box.append(normalize_pixels(image))
        box.append(tasks() - before)

    worker = threading.Thread(target=pool_thread)
    worker.start()
    worker.join()
    assert torch.equal(box[0], want) and box[0].is_contiguous()
    assert box[1] == 0  # the torch formula above, run on such a thread, leaves one more (OpenMP worker) thread
