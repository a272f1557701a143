"""Qwen-VL images against ``shared/golden/qwen_vl`` (outputs of the original ``visual.py`` + ``modeling_qwen.py``):
pixel values, per-image vision embeddings, full-prompt logits and 8 greedy tokens with their log-probabilities, all
through ``rtp_mm.LLM`` with the token-id prompts of inputs.json and the PNG files of the case. Plus the placeholder
expansion rules (count mismatch, unclosed spans), EXTRA_DATA_PATH and bad visual weights.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rtp_mm import GenerateConfig
from rtp_mm.errors import CheckpointError, InvalidRequest, PromptTooLongError
from rtp_mm.llm.loader import open_checkpoint
from rtp_mm.vision.qwen_vl import QwenVLVision, load_qwen_vl, sincos_2d
from rtp_mm_testing.engine_probe import prefill, prompt_logits
from rtp_mm_testing.golden_legacy import assert_greedy_golden, assert_logits_close, golden_case
from rtp_mm_testing.oracle import tiny_llm
from rtp_mm_testing.shared import GOLDEN

FOLDER = GOLDEN / "qwen_vl"
START, END, PAD = 481, 482, 483  # the golden config's remapped <img>, </img>, <imgpad>


@pytest.fixture(scope="module")
def case():
    return golden_case("qwen_vl")


@pytest.fixture(scope="module")
def llm(case):
    with tiny_llm(case[0], "qwen_vl", max_seq_len=1024) as llm:
        yield llm


def _images(item: dict) -> list[str]:
    return [str(FOLDER / name) for name in item.get("images", [])]


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    err = float((got.float() - expected).abs().max())
    assert got.shape == expected.shape and err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def test_pixels_and_vision_embeddings(llm, case):
    _, inputs, expected = case
    model = llm.vision
    assert isinstance(model, QwenVLVision)
    for item in inputs:
        pixels = [model.preprocess(Image.open(path)) for path in _images(item)]
        for k, p in enumerate(pixels):
            ref = expected[f"pixel_values_{item['name']}_{k}"]
            assert p.shape == ref.shape and float((p - ref).abs().max()) <= 1e-5, (item["name"], k)
        # The original ran the images of a prompt as one batch; one at a time must give the same rows.
        batched = model.encode(pixels)
        alone = [model.encode([p])[0] for p in pixels]
        for k, (b, a) in enumerate(zip(batched, alone, strict=True)):
            ref = expected[f"vision_embeds_{item['name']}_{k}"]
            _close(b, ref, f"{item['name']} image {k} (batched)")
            _close(a, ref, f"{item['name']} image {k}")


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param(
            "cuda",
            torch.float16,
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        ),
    ],
)
def test_half_precision_encoder(case, device, dtype):
    """The encoder runs in the LM's dtype on any device; rows come back in that dtype, near the fp32 reference."""
    _, _, expected = case
    config = json.loads((FOLDER / "checkpoint" / "config.json").read_text())
    model = load_qwen_vl(str(FOLDER / "checkpoint"), config, "", device, dtype)
    rows = model.encode([model.preprocess(Image.open(FOLDER / "img0.png"))])[0]
    ref = expected["vision_embeds_one_image_0"]
    assert rows.dtype == dtype and rows.device.type == device
    err = float((rows.float().cpu() - ref).abs().max())
    assert err < 0.05 * float(ref.abs().max()), err


def test_resampler_position_table_is_the_2d_sincos_table():
    ckpt = open_checkpoint(FOLDER / "checkpoint")
    try:
        stored = ckpt.get("transformer.visual.attn_pool.pos_embed")
    finally:
        ckpt.close()
    # NumPy's float32 sin/cos dispatch on CPU features (AVX-512 vs AVX2 SIMD kernels, a few ULP apart), so the table
    # is reproduced to within float32 rounding, not bit for bit: seen 4.8e-7 apart on one machine, ~4 ULP of values
    # in [-1, 1] (ULP 6e-8 below 1). 2e-6 is ~30 ULP, while a wrong frequency or axis order is off by ~1.
    torch.testing.assert_close(sincos_2d(stored.shape[1], math.isqrt(stored.shape[0])), stored, atol=2e-6, rtol=0)


def test_golden_logits(llm, case):
    _, inputs, expected = case
    for item in inputs:
        logits, _, req = prefill(llm, item["input_ids"], _images(item))
        assert req.prompt_ids == item["input_ids"]  # the tokenizer's 256-id spans keep the prompt as it is
        assert [mm.offset for mm in req.mm_inputs] == [i + 1 for i, t in enumerate(item["input_ids"]) if t == START]
        assert_logits_close(logits, expected[f"logits_{item['name']}"], item["name"])


def test_golden_greedy_alone_and_batched(llm, case):
    """8 greedy tokens (EOS ignored) and their log-probabilities, each prompt alone and all three in one batch; the
    second round finds every image in the encoder cache."""
    _, inputs, expected = case
    cfg = GenerateConfig(max_new_tokens=8, top_k=1, logprobs=5, ignore_eos=True)
    prompts = [item["input_ids"] for item in inputs]
    images = [_images(item) for item in inputs]
    alone = [llm.generate([p], cfg, images=[imgs])[0] for p, imgs in zip(prompts, images, strict=True)]
    hits = llm.stats()["vision_cache_hits"]
    together = llm.generate(prompts, cfg, images=images)
    assert llm.stats()["vision_cache_hits"] - hits == sum(len(i) for i in images)
    for outs in (alone, together):
        assert_greedy_golden(outs, inputs, expected)


def test_image_order_matters(llm, case):
    """Swapping the two images changes the answer's logits: each span takes its own image, in order."""
    _, inputs, expected = case
    item = next(i for i in inputs if i["name"] == "two_images")
    got = prompt_logits(llm, item["input_ids"], _images(item)[::-1])
    assert float((got - expected["logits_two_images"]).abs().max()) > 1e-2


def test_prefix_cache_keys_include_the_image(llm, case):
    """Same ids, another image: only the blocks before the image span are reused, and the answer is the one an
    uncached engine gives; the first image again: its blocks are reused and the golden answer comes back."""
    ckpt, inputs, expected = case
    item = next(i for i in inputs if i["name"] == "one_image")
    other = [str(FOLDER / "img1.png")]
    cfg = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True)
    uncached = llm.generate([item["input_ids"]], cfg, images=[other])[0].token_ids
    start = item["input_ids"].index(START)
    with tiny_llm(ckpt, "qwen_vl", max_seq_len=1024, reuse_cache=True) as cached:
        block = cached.model_config.seq_size_per_block
        first = cached.generate([item["input_ids"]], cfg, images=[_images(item)])[0]
        swapped = cached.generate([item["input_ids"]], cfg, images=[other])[0]
        again = cached.generate([item["input_ids"]], cfg, images=[_images(item)])[0]
    assert first.token_ids == again.token_ids == expected["greedy_one_image"].tolist()
    assert swapped.token_ids == uncached != first.token_ids
    assert swapped.aux_info["reuse_len"] <= (start + 1) // block * block
    assert again.aux_info["reuse_len"] > start + 256


# ---- placeholder expansion ------------------------------------------------------------------------------------


def _span(content: list[int]) -> list[int]:
    return [START, *content, END]


def test_expand_rules(llm):
    model = llm.vision
    rows = [torch.full((256, 128), float(k)) for k in range(2)]
    full = [105, 109, 103] + [PAD] * 253
    prompt = [1, 2, *_span(full), 3, *_span([7, 8]), 4]
    out = model.expand(prompt, rows, ["h0", "h1"])
    # A 256-id span keeps its ids; a short hand-made span grows to 256 <imgpad> ids.
    assert out.token_ids == [1, 2, *_span(full), 3, *_span([PAD] * 256), 4]
    assert [(mm.offset, mm.content_hash) for mm in out.mm_inputs] == [(3, "h0"), (3 + 256 + 3, "h1")]
    assert out.mm_inputs[1].embeds is rows[1] and out.positions is None
    with pytest.raises(InvalidRequest, match="2 <img>...</img> spans but 1 images"):
        model.expand(prompt, rows[:1], ["h0"])
    with pytest.raises(InvalidRequest, match="not closed"):
        model.expand([1, START, 5, 6], rows[:1], ["h0"])
    with pytest.raises(InvalidRequest, match="closes no <img>"):
        model.expand([1, END, *_span(full)], rows[:1], ["h0"])
    with pytest.raises(InvalidRequest, match="not closed before <img>"):
        model.expand([START, 5, *_span(full)], rows[:1], ["h0"])


def test_request_errors_through_the_api(llm, case):
    _, inputs, _ = case
    one = next(i for i in inputs if i["name"] == "one_image")
    with pytest.raises(InvalidRequest, match="1 <img>...</img> spans but 2 images"):
        llm.generate([one["input_ids"]], GenerateConfig(max_new_tokens=1), images=[_images(one) * 2])
    with pytest.raises(InvalidRequest, match="not closed"):
        llm.generate([one["input_ids"][:40]], GenerateConfig(max_new_tokens=1), images=[_images(one)])
    # 30 ids with three hand-made 2-id spans expand to 792 ids: over MAX_SEQ_LEN although 30 ids are not.
    short = [5, 6, *_span([7, 8]), 9] * 3 + [10] * 12
    with tiny_llm(case[0], "qwen_vl", max_seq_len=len(short) + 3 * 256 - 250) as small:
        with pytest.raises(PromptTooLongError, match="max_seq_len"):
            small.generate([short], GenerateConfig(max_new_tokens=1), images=[_images(one) * 3])


def test_image_placeholder_is_qwen_vl_chat_text(llm):
    assert llm.vision.image_placeholder(0) == "Picture 1: <img>image_1</img>\n"
    assert llm.vision.image_placeholder(1).startswith("Picture 2: <img>")


# ---- weights: EXTRA_DATA_PATH and bad files -------------------------------------------------------------------


def _visual_tensors(prefix: str = "transformer.visual.") -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(FOLDER / "checkpoint")
    try:
        return {
            prefix + k[len("transformer.visual.") :]: ckpt.get(k).clone()
            for k in ckpt.keys()
            if k.startswith("transformer.visual.")
        }
    finally:
        ckpt.close()


def _config() -> dict:
    return json.loads((FOLDER / "checkpoint" / "config.json").read_text())


def test_extra_data_path_wins(tmp_path, case):
    """Visual weights in a separate folder (``visual.*`` names, the fixed position table left out) are used instead
    of the checkpoint's: with ``proj`` doubled there, every image row doubles."""
    _, _, expected = case
    tensors = _visual_tensors("visual.")
    del tensors["visual.attn_pool.pos_embed"]
    tensors["visual.proj"] = tensors["visual.proj"] * 2
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_qwen_vl(str(FOLDER / "checkpoint"), _config(), str(tmp_path), "cpu", torch.float32)
    rows = model.encode([model.preprocess(Image.open(FOLDER / "img0.png"))])[0]
    _close(rows, 2 * expected["vision_embeds_one_image_0"], "EXTRA_DATA_PATH")


def test_extra_data_path_through_llm(tmp_path, case):
    ckpt, inputs, expected = case
    save_file(_visual_tensors(), str(tmp_path / "model.safetensors"))
    item = next(i for i in inputs if i["name"] == "one_image")
    with tiny_llm(ckpt, "qwen_vl", max_seq_len=512, extra_data_path=str(tmp_path)) as llm:
        out = llm.generate(
            [item["input_ids"]], GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True), images=[_images(item)]
        )[0]
    assert out.token_ids == expected["greedy_one_image"].tolist()


def test_bad_visual_weights_are_clear_errors(tmp_path):
    config = _config()
    tensors = _visual_tensors()
    del tensors["transformer.visual.ln_post.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*ln_post.weight"):
        load_qwen_vl("unused", config, str(tmp_path), "cpu", torch.float32)
    tensors = _visual_tensors()
    tensors["transformer.visual.proj"] = torch.zeros(64, 128)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"weight proj has shape \(64, 128\); config.json visual implies \(128, 128"
    ):
        load_qwen_vl("unused", config, str(tmp_path), "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="output_dim=128 != hidden_size=256"):
        load_qwen_vl("unused", {**config, "hidden_size": 256}, str(tmp_path), "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="no 'visual'"):
        load_qwen_vl("unused", {"hidden_size": 128}, str(tmp_path), "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="EXTRA_DATA_PATH"):
        load_qwen_vl("unused", config, str(tmp_path / "nope"), "cpu", torch.float32)


def test_checkpoint_without_visual_weights(tmp_path):
    shutil.copy(FOLDER / "checkpoint" / "config.json", tmp_path / "config.json")
    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no Qwen-VL visual weights"):
        load_qwen_vl(str(tmp_path), _config(), "", "cpu", torch.float32)
