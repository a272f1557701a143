"""VisionRunner: ViT batching across concurrent requests, the shared image encoded once, preprocessing in the
worker pool, the LRU byte budget, failures that release their waiters, the backend slot, and the counters in
``LLM.stats()``. Oracle for outputs: the same requests run one at a time on a separate engine."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.vision.runner import VisionRunner
from rtp_mm_testing.fake_vision import MODEL_TYPE, ROWS, FakeVisionModel, make_checkpoint, picture, registered
from rtp_mm_testing.oracle import tiny_llm

HIDDEN = 64
CFG = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with registered():
        path = tmp_path_factory.mktemp("fake_vision_runner")
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
        llm.vision.gather_s = 0.3  # every request of the burst arrives inside one gather window
        fake = llm.vision.model
        barrier = threading.Barrier(len(prompts))
        results: dict[int, list[int]] = {}

        def one(i: int) -> None:
            barrier.wait()
            results[i] = llm.generate([prompts[i]], CFG, images=[[images[i]]])[0].token_ids

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pairs = zip(prompts, images, strict=True)
        alone = [alone_llm.generate([p], CFG, images=[[im]])[0].token_ids for p, im in pairs]
        assert [results[i] for i in range(len(prompts))] == alone
        stats = llm.stats()
        assert stats["vision_images_encoded"] == stats["vision_cache_misses"] == 4  # the shared image: once
        assert stats["vision_cache_hits"] == 2
        assert sum(fake.batch_sizes) == 4 and max(fake.batch_sizes) >= 2  # images of several requests per call
        assert stats["vision_encode_batches"] == len(fake.batch_sizes) < 4
        assert stats["vision_cache_entries"] == 4 and stats["vision_cache_bytes"] == 4 * ROWS * HIDDEN * 4
        assert fake.preprocess_threads and all(n.startswith("rtp-mm-vision") for n in fake.preprocess_threads)
    finally:
        llm.shutdown()
        alone_llm.shutdown()


def _runner(**kw) -> tuple[VisionRunner, FakeVisionModel]:
    fake = FakeVisionModel(image_token_id=9, hidden=HIDDEN)
    return VisionRunner(fake, gather_s=0.0, **kw), fake


def test_lru_byte_budget_and_repeats_inside_one_request():
    one_image = ROWS * HIDDEN * 4
    runner, fake = _runner(cache_bytes=2 * one_image)
    a, b, c = picture(1), picture(2), picture(3)
    first = runner.prepare([9, 9, 5], [a, a])  # a repeated image is encoded once
    assert fake.batch_sizes == [1]
    assert torch.equal(first.mm_inputs[0].embeds, first.mm_inputs[1].embeds)
    assert [m.offset for m in first.mm_inputs] == [0, ROWS]
    runner.prepare([9], [b])
    runner.prepare([9], [c])  # over budget: a (least recently used) is evicted
    assert runner.stats()["vision_cache_entries"] == 2 and runner.stats()["vision_cache_bytes"] == 2 * one_image
    runner.prepare([9], [c])
    assert fake.batch_sizes == [1, 1, 1]  # c was a hit
    runner.prepare([9], [a])
    assert fake.batch_sizes == [1, 1, 1, 1]  # a had been evicted
    s = runner.stats()
    assert (s["vision_cache_hits"], s["vision_cache_misses"]) == (2, 4)
    runner.close()


def test_failures_reach_their_requests_and_release_the_runner():
    runner, fake = _runner()
    with pytest.raises(InvalidRequest, match="image 1 is not a decodable image"):
        runner.prepare([9, 9], [picture(1), io.BytesIO(b"x").getvalue() + b"not an image"])
    fake.fail_encode = True
    with pytest.raises(RuntimeError, match="fake encoder failure"):
        runner.prepare([9], [picture(5)])
    fake.fail_encode = False
    out = runner.prepare([9], [picture(5)])  # nothing left in flight: the same image encodes now
    assert out.mm_inputs[0].embeds.shape == (ROWS, HIDDEN)
    runner.close()


def test_backend_slot_replaces_the_encoder():
    calls = []

    def backend(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(pixels))
        return [torch.full((ROWS, HIDDEN), 0.5) for _ in pixels]

    fake = FakeVisionModel(image_token_id=9, hidden=HIDDEN)
    runner = VisionRunner(fake, encode_fn=backend, gather_s=0.0)
    out = runner.prepare([3, 9], [picture(1)])
    assert calls == [1] and fake.batch_sizes == []
    assert torch.equal(out.mm_inputs[0].embeds, torch.full((ROWS, HIDDEN), 0.5))
    runner.close()


def test_one_generate_call_encodes_its_prompts_images_together(ckpt):
    path, image_id = ckpt
    prompts = _prompts(image_id)[:3]
    images = [[picture(20)], [picture(21)], [picture(22)]]
    with registered():
        llm = tiny_llm(path, MODEL_TYPE)
    try:
        llm.vision.gather_s = 0.3
        outs = llm.generate(prompts, CFG, images=images)
        alone = [llm.generate([p], CFG, images=[im])[0].token_ids for p, im in zip(prompts, images, strict=True)]
        assert [o.token_ids for o in outs] == alone
        assert sum(llm.vision.model.batch_sizes) == 3 and max(llm.vision.model.batch_sizes) >= 2
    finally:
        llm.shutdown()


def test_cpu_vit_runs_on_the_engine_thread_between_steps(ckpt):
    """The eager ViT on CPU is marshalled onto the engine thread (no OpenMP team per caller thread, loop.py); concurrent
    requests still get their own rows, and a request after shutdown fails instead of hanging."""
    path, image_id = ckpt
    with registered():
        llm = tiny_llm(path, MODEL_TYPE)
    threads: list[str] = []
    hook = llm.vision.model.visual_module().register_forward_hook(
        lambda *_: threads.append(threading.current_thread().name)
    )
    try:
        prompts = _prompts(image_id)[:3]
        outs = llm.generate(prompts, generate_config=CFG, images=[[picture(s)] for s in (5, 6, 7)])
        assert len(outs) == 3 and threads and set(threads) == {"rtp-mm-engine"}
    finally:
        hook.remove()
        llm.shutdown()
    with pytest.raises(Exception, match="shut down|stopped"):
        llm.vision.encode_fn([llm.vision.model.preprocess(picture(8))])


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
