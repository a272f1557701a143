"""EncodeStage, the engine's vision stage, on its own: images of several requests encoded in one batch, each distinct
image once, the LRU byte budget, ``max_batch`` spread over steps, requests completing only with all their rows (even
when the cache cannot keep them), failures that reach exactly the requests needing the image, aborts, and a backend
``encode`` in place of the eager one. Rows are checked against the fake encoder called directly."""

from __future__ import annotations

import pytest
import torch

from rtp_mm.errors import InvalidRequest, RtpMmError
from rtp_mm.llm.engine.multimodal import EncodeStage
from rtp_mm.vision.inputs import image_encoder, prepare_image
from rtp_mm_testing.fake_vision import ROWS, FakeVisionModel, picture

HIDDEN = 16
IMAGE_ID = 9
ONE_IMAGE_BYTES = ROWS * HIDDEN * 4


def stage(max_batch: int = 16, cache_bytes: int = 1 << 20, encode=None) -> tuple[EncodeStage, FakeVisionModel]:
    fake = FakeVisionModel(image_token_id=IMAGE_ID, hidden=HIDDEN)
    return EncodeStage(image_encoder(fake, encode, max_batch), cache_bytes=cache_bytes), fake


def images(fake: FakeVisionModel, *seeds: int):
    return tuple(prepare_image(fake, picture(s), k) for k, s in enumerate(seeds))


def expected_rows(fake: FakeVisionModel, seed: int) -> torch.Tensor:
    return FakeVisionModel(IMAGE_ID, HIDDEN).encode([fake.preprocess(picture(seed))])[0]


def run(st: EncodeStage) -> dict:
    """Step until the stage is empty; request id -> PreparedPrompt or error."""
    results: dict = {}
    for _ in range(50):
        if not st.has_work:
            return results
        ready, failed = st.step()
        results.update(ready)
        results.update(failed)
    raise AssertionError("the encode stage made no progress")


def test_images_of_several_requests_share_one_batch_and_each_distinct_image_is_encoded_once():
    st, fake = stage()
    st.add(1, [1, IMAGE_ID, 2], images(fake, 1))
    st.add(2, [IMAGE_ID, IMAGE_ID], images(fake, 2, 1))  # image 1 again, from another request
    st.add(3, [3, IMAGE_ID], images(fake, 3))
    ready, failed = st.step()
    assert failed == [] and fake.batch_sizes == [3] and not st.has_work
    prepared = dict(ready)
    assert prepared[1].token_ids == [1] + [IMAGE_ID] * ROWS + [2]
    torch.testing.assert_close(prepared[2].mm_inputs[1].embeds, expected_rows(fake, 1), rtol=0, atol=0)
    assert [m.offset for m in prepared[2].mm_inputs] == [0, ROWS]
    assert (st.stats.cache_misses, st.stats.cache_hits, st.stats.images_encoded) == (3, 1, 3)


def test_lru_byte_budget():
    st, fake = stage(cache_bytes=2 * ONE_IMAGE_BYTES)
    for request_id, seed in enumerate((1, 1, 2, 3, 3, 1)):
        st.add(request_id, [IMAGE_ID], images(fake, seed))
        run(st)
    # 1 (miss), 1 (hit), 2, 3 (miss; evicts 1), 3 (hit), 1 (evicted: encoded again)
    assert fake.batch_sizes == [1, 1, 1, 1] and (st.stats.cache_hits, st.stats.cache_misses) == (2, 4)
    assert st.report()["vision_cache_entries"] == 2 and st.report()["vision_cache_bytes"] == 2 * ONE_IMAGE_BYTES


def test_max_batch_spreads_over_steps_and_a_request_completes_only_with_all_its_rows():
    st, fake = stage(max_batch=2, cache_bytes=0)  # nothing cached: the request must hold its own rows
    st.add(7, [IMAGE_ID] * 5, images(fake, 1, 2, 3, 4, 5))
    st.add(8, [IMAGE_ID], images(fake, 6))
    steps = []
    while st.has_work:
        ready, failed = st.step()
        steps.append(sorted(request_id for request_id, _ in ready))
        assert failed == []
    assert fake.batch_sizes == [2, 2, 2] and steps == [[], [], [7, 8]]  # oldest request's images first


def test_failures_reach_only_the_requests_that_need_the_image():
    st, fake = stage(max_batch=1)
    st.add(1, [IMAGE_ID], images(fake, 1))
    st.add(2, [IMAGE_ID, IMAGE_ID], images(fake, 2, 1))
    fake.fail_encode = True
    ready, failed = st.step()
    assert ready == [] and sorted(request_id for request_id, _ in failed) == [1, 2]
    assert all(isinstance(e, RtpMmError) and "fake encoder failure" in e.message for _, e in failed)
    fake.fail_encode = False
    st.add(3, [IMAGE_ID], images(fake, 1))  # nothing is left in flight: the same image encodes now
    assert list(run(st)) == [3]


def test_a_placeholder_mismatch_fails_that_request_alone():
    st, fake = stage()
    st.add(1, [IMAGE_ID, IMAGE_ID], images(fake, 1))
    st.add(2, [IMAGE_ID], images(fake, 2))
    results = run(st)
    assert isinstance(results[1], InvalidRequest) and "not matched" in results[1].message
    assert results[2].token_ids == [IMAGE_ID] * ROWS


def test_removed_requests_are_never_encoded():
    st, fake = stage()
    st.add(1, [IMAGE_ID], images(fake, 1))
    assert st.remove(1) and not st.remove(1) and not st.has_work
    assert run(st) == {} and fake.batch_sizes == []


def test_a_backend_encode_replaces_the_eager_one():
    calls = []

    def backend(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(pixels))
        return [torch.full((ROWS, HIDDEN), 0.5) for _ in pixels]

    st, fake = stage(encode=backend)
    st.add(1, [3, IMAGE_ID], images(fake, 1))
    (prepared,) = run(st).values()
    assert calls == [1] and fake.batch_sizes == []
    assert torch.equal(prepared.mm_inputs[0].embeds, torch.full((ROWS, HIDDEN), 0.5))


def test_a_backend_returning_the_wrong_number_of_rows_fails_its_requests():
    st, fake = stage(encode=lambda pixels: [])
    st.add(1, [IMAGE_ID], images(fake, 1))
    (error,) = run(st).values()
    assert isinstance(error, RtpMmError) and "returned 0 outputs for 1 images" in error.message


@pytest.mark.parametrize("bad", [b"not an image", 12])
def test_undecodable_images_fail_where_they_are_prepared(bad):
    fake = FakeVisionModel(image_token_id=IMAGE_ID, hidden=HIDDEN)
    with pytest.raises(InvalidRequest, match="image 3"):
        prepare_image(fake, bad, 3)
