"""chatglm4v (GLM-4V) against the golden data of the original implementation: preprocessing, vision embeddings,
image position ids, full-prompt logits and greedy decoding through ``rtp_mm.LLM``; plus the engine's explicit
positions under chunked prefill, preemption and prefix caching, the EXTRA_DATA_PATH layout and bad input."""

from __future__ import annotations

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import CheckpointError, InvalidRequest, PromptTooLongError
from rtp_mm.llm.engine.multimodal import PreparedPrompt
from rtp_mm.llm.engine.request import Request
from rtp_mm.llm.models.prompt_layout import PromptLayout
from rtp_mm_testing.engine_probe import prefill
from rtp_mm_testing.golden_legacy import assert_greedy_golden, assert_logits_close, golden_case
from rtp_mm_testing.shared import GOLDEN

CASE = GOLDEN / "glm4v"
GREEDY = GenerateConfig(max_new_tokens=8, top_k=1, logprobs=5, ignore_eos=True)
BOI, EOT, EOI = 498, 488, 499  # the golden checkpoint's remapped <|begin_of_image|> <|endoftext|> <|end_of_image|>


def glm4v_llm(path=None, block: int = 8, **engine) -> LLM:
    config = ModelConfig(
        model_type="chatglm4v",
        ckpt_path=str(path or CASE / "checkpoint"),
        max_seq_len=engine.pop("max_seq_len", 256),
        weight_type="FP32",
        seq_size_per_block=block,
    )
    return LLM(config, kv_cache_mem_mb=engine.pop("kv_cache_mem_mb", 4), skip_tokenizer_init=True, **engine)


@pytest.fixture(scope="module")
def golden():
    _, inputs, expected = golden_case("glm4v")
    return inputs, expected


@pytest.fixture(scope="module")
def llm():
    with glm4v_llm() as llm:
        yield llm


def images_of(item: dict) -> list[str]:
    return [str(CASE / name) for name in item["images"]]


def generate(llm: LLM, items: list[dict], config: GenerateConfig = GREEDY):
    return llm.generate([it["input_ids"] for it in items], config, images=[images_of(it) for it in items])


# ---- the golden cases ------------------------------------------------------------------------------------------


def test_golden_pixels_embeddings_positions(llm, golden):
    inputs, expected = golden
    vision = llm.vision
    for item in inputs:
        for k, image in enumerate(images_of(item)):
            pixels = vision.preprocess(Image.open(image))
            ref = expected[f"pixel_values_{item['name']}_{k}"]
            assert pixels.shape == ref.shape and float((pixels - ref).abs().max()) <= 1e-5, item["name"]
            (rows,) = vision.encode([pixels])
            assert_logits_close(rows, expected[f"vision_embeds_{item['name']}_{k}"], f"{item['name']} embeds")


def test_golden_full_prompt_logits(llm, golden):
    inputs, expected = golden
    for item in inputs:
        logits, positions, _ = prefill(llm, item["input_ids"], images_of(item))
        assert positions == expected[f"position_ids_{item['name']}"].tolist(), item["name"]
        assert_logits_close(logits, expected[f"logits_{item['name']}"], item["name"])


def test_golden_greedy_alone_and_batched(llm, golden):
    inputs, expected = golden
    assert_greedy_golden([generate(llm, [item])[0] for item in inputs], inputs, expected)
    outs = generate(llm, inputs)  # prefills and decodes of different lengths in shared steps
    assert_greedy_golden(outs, inputs, expected)
    image = next(o for o, it in zip(outs, inputs, strict=True) if it["name"] == "image")
    assert image.aux_info["input_len"] == 16 + 4 - 1  # expanded tokens: 3 placeholder ids became 6 rows


def test_chunked_prefill_splits_the_image_span(golden):
    """A step budget of 3 tokens cuts every image span (6 rows) across steps; with 4-token blocks too."""
    inputs, expected = golden
    with glm4v_llm(block=4, max_num_batched_tokens=3) as llm:
        assert_greedy_golden(generate(llm, inputs), inputs, expected)


def test_preemption_recomputes_with_the_same_positions(golden):
    """A KV cache too small for all four requests at once: some are preempted and recomputed from scratch
    (prompt and generated tokens), and every output still matches the original."""
    inputs, expected = golden
    with glm4v_llm(block=4, kv_cache_blocks=20, max_seq_len=80) as llm:
        assert_greedy_golden(generate(llm, inputs), inputs, expected)
        assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_keys_images_and_positions(golden):
    inputs, expected = golden
    item = next(it for it in inputs if it["name"] == "image_gray_long")
    other = dict(item, images=["img0.png"])  # same ids, another image
    with glm4v_llm(block=4, reuse_cache=True) as llm:
        first = generate(llm, [item])[0]
        again = generate(llm, [item])[0]
        assert_greedy_golden([first, again], [item, item], expected)
        assert again.aux_info["reuse_len"] > 24  # blocks past the image are reused
        changed = generate(llm, [other])[0]
        assert changed.aux_info["reuse_len"] <= 24  # only the blocks before the image (at index 24)
        solo = glm4v_llm(block=4)
        try:
            assert changed.token_ids == generate(solo, [other])[0].token_ids
        finally:
            solo.shutdown()


def test_block_hashes_follow_positions(llm):
    """Same token ids and image, different positions: no block after the first differing position is shared."""
    from rtp_mm.llm.engine.block_manager import BlockManager

    ids = list(range(10, 30))
    plain = Request(1, ids, GenerateConfig(max_new_tokens=1), max_total_len=21)
    positions = tuple(range(8)) + (7,) * 4 + tuple(range(8, 16))
    shifted = Request(2, ids, GenerateConfig(max_new_tokens=1), max_total_len=21, layout=PromptLayout(positions))
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a, b = bm._full_block_hashes(plain, 20), bm._full_block_hashes(shifted, 20)
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))


# ---- weights from EXTRA_DATA_PATH, and bad input ----------------------------------------------------------------


def test_vision_weights_from_extra_data_path(tmp_path, golden):
    inputs, expected = golden
    tensors = load_file(str(CASE / "checkpoint" / "model.safetensors"))
    lm = tmp_path / "lm"
    lm.mkdir()
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("transformer.vision.")}, str(lm / "model.safetensors")
    )
    (lm / "config.json").write_text((CASE / "checkpoint" / "config.json").read_text())
    vit = tmp_path / "vit"
    vit.mkdir()
    prefix = "transformer.vision."
    save_file({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, str(vit / "model.safetensors"))
    item = next(it for it in inputs if it["name"] == "image_rgba")
    with glm4v_llm(lm, extra_data_path=str(vit)) as llm:
        assert_greedy_golden(generate(llm, [item]), [item], expected)
    with pytest.raises(CheckpointError, match="transformer.vision"):
        glm4v_llm(lm)


def test_bad_prompts_are_clear_errors(llm, golden):
    inputs, _ = golden
    image = str(CASE / "img0.png")
    prompt = next(it for it in inputs if it["name"] == "image")["input_ids"]
    with pytest.raises(InvalidRequest, match="does not match the number of images"):
        llm.generate([prompt], GREEDY, images=[[image, image]])
    with pytest.raises(InvalidRequest, match="does not match the number of images"):
        llm.generate([[490, 492, 495, 332, 5, 496]], GREEDY, images=[[image]])
    with pytest.raises(InvalidRequest, match="not closed"):
        llm.generate([[490, 492, BOI, EOT, 7, EOI, 496]], GREEDY, images=[[image]])
    with pytest.raises(InvalidRequest, match="end_of_image"):
        llm.generate([[490, 492, BOI, EOT, EOI, EOI, 496]], GREEDY, images=[[image]])
    submitted = llm.make_request([1, 2], GREEDY)
    with pytest.raises(InvalidRequest, match="positions has 3 entries"):
        llm.client.call(lambda engine: engine.make_request(submitted, PreparedPrompt([1, 2], positions=[0, 1, 2])))
    with glm4v_llm(max_seq_len=20) as short:
        with pytest.raises(PromptTooLongError):
            short.generate([prompt + [5, 6]], GREEDY, images=[[image]])  # 18 ids, 21 after expansion


def test_two_images_each_keep_their_span(llm, golden):
    """Two spans in one prompt: each image's rows share the position after its boi; later text keeps its index."""
    _, expected = golden
    prompt = [490, 492, 495, 332, BOI, EOT, EOI, 10, BOI, EOT, EOI, 11, 496]
    _, _, req = prefill(llm, prompt, [str(CASE / "img0.png"), str(CASE / "img2.png")])
    assert list(req.layout.positions) == [0, 1, 2, 3, 4, 5, 5, 5, 5, 6, 7, 8, 9, 9, 9, 9, 10, 11, 12]
    assert [mm.offset for mm in req.mm_inputs] == [4, 11]
    assert_logits_close(req.mm_inputs[1].embeds, expected["vision_embeds_image_gray_long_0"], "second image")


def test_generated_tokens_continue_from_the_last_prompt_position(llm):
    """Prompt tokens take the explicit positions; generated ones count on from the last of them (the un-expanded
    length for an image prompt), whatever range a chunk or a recompute asks for."""
    layout = PromptLayout(positions=(0, 1, 2, 2, 2, 3))
    req = Request(1, [5] * 6, GenerateConfig(max_new_tokens=4), max_total_len=10, layout=layout)
    req.output_ids += [7, 8, 9]
    assert req.positions_of(0, 9) == [0, 1, 2, 2, 2, 3, 4, 5, 6]
    assert req.positions_of(4, 8) == [2, 3, 4, 5]
    assert req.positions_of(7, 8) == [5]
