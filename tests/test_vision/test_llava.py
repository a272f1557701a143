"""llava's vision stack against transformers: tiny random ``LlavaForConditionalGeneration`` (LLaVA-1.5) and
``LlavaNextForConditionalGeneration`` (anyres) models built here are the oracle.

Each is served from the llava-hf layout (save_pretrained, transformers-4 and -5 names) and re-written in the original
``LlavaLlamaForCausalLM`` layout with the CLIP tower in its own folder (EXTRA_DATA_PATH). HF's own image processors
give the reference pixel values; pixels, image embeddings (1e-4) and 24 greedy tokens must match for one image, two
images, and images of different sizes and aspect ratios.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.errors import CheckpointError, InvalidRequest
from rtp_mm.vision.base import load_vision_model
from rtp_mm.vision.llava import IMAGE_TOKEN_INDEX, TiledImage
from rtp_mm_testing.llava import (
    IMAGE,
    IMAGE_TOKEN,
    NEW_TOKENS,
    SIZES,
    TINY_CLIP,
    hf_features,
    hf_generate,
    image,
    processor,
    save_llava,
    tiny_llava,
)
from rtp_mm_testing.oracle import TINY_LLAMA, tiny_llm
from rtp_mm_testing.original_layout import hf_state

CASES = [  # (text chunks around the images, image sizes, seeds)
    ([[1, 5, 9], [17, 4]], [SIZES[0]], [0]),
    ([[1, 7], [33, 12, 8], [40]], [SIZES[1], SIZES[2]], [1, 2]),
    ([[1], [3], [6, 70, 2]], [SIZES[3], SIZES[1]], [3, 4]),
]


def check_llava(model, proc, path: Path, extra: str, placeholder: int) -> None:
    with tiny_llm(path, "llava", max_seq_len=256, extra_data_path=extra) as llm:
        vision = llm.vision
        cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True)
        for chunks, sizes, seeds in CASES:
            images = [image(s, seed) for s, seed in zip(sizes, seeds, strict=True)]
            inputs, expected = hf_features(model, proc, images)
            for n, img in enumerate(images):
                pixels = vision.preprocess(img)
                ours = pixels.views if isinstance(pixels, TiledImage) else pixels[None]
                ref = inputs["pixel_values"][n]
                ref = ref[: ours.shape[0]] if ref.dim() == 4 else ref[None]
                torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)
                (rows,) = vision.encode([pixels])
                torch.testing.assert_close(rows, expected[n], atol=1e-4, rtol=0)
            prompt = [t for chunk in chunks[:-1] for t in (*chunk, placeholder)] + chunks[-1]
            (out,) = llm.generate([prompt], cfg, images=[images])
            assert out.token_ids == hf_generate(model, proc, chunks, images), (sizes, out.token_ids)


LLAVA_15 = [("save_pretrained", False), ("transformers4", True), ("transformers5", False), ("original", True)]


@pytest.mark.parametrize(("layout", "pad"), LLAVA_15)
def test_llava_15_parity(tmp_path, layout, pad):
    model, proc = tiny_llava("llava"), processor("llava", pad)
    path, extra = save_llava(model, proc, tmp_path / "ckpt", layout)
    placeholder = IMAGE_TOKEN_INDEX if layout == "original" else IMAGE_TOKEN
    check_llava(model, proc, path, extra, placeholder)


@pytest.mark.parametrize("layout", ["save_pretrained", "transformers4", "original"])
def test_llava_next_anyres_parity(tmp_path, layout):
    model, proc = tiny_llava("next", seed=6), processor("next")
    path, extra = save_llava(model, proc, tmp_path / "ckpt", layout)
    placeholder = IMAGE_TOKEN_INDEX if layout == "original" else IMAGE_TOKEN
    check_llava(model, proc, path, extra, placeholder)


# ---- loading and prompt errors ----------------------------------------------------------------------------------


def _vision(path: Path, extra: str = ""):
    import json

    config = json.loads((path / "config.json").read_text())
    return load_vision_model("llava", str(path), config, extra, "cpu", torch.float32)


def test_original_tower_from_mm_vision_tower_folder(tmp_path):
    """Without EXTRA_DATA_PATH the tower comes from the local folder mm_vision_tower names; a hub name that is not
    a local folder is a clear error naming EXTRA_DATA_PATH."""
    import json

    model, proc = tiny_llava("llava"), processor("llava", pad=True)
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "original")
    with pytest.raises(CheckpointError, match="EXTRA_DATA_PATH"):
        _vision(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "mm_vision_tower": extra}))
    img = image(SIZES[1], 9)
    _, (expected,) = hf_features(model, proc, [img])
    vision = _vision(path)
    (rows,) = vision.encode([vision.preprocess(img)])
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)


def test_unfrozen_tower_in_the_checkpoint_wins(tmp_path):
    """A LLaVA checkpoint that carries its fine-tuned tower: those tensors replace the CLIP folder's when the config
    says the tower was unfrozen."""
    import json

    from safetensors.torch import load_file, save_file

    model, proc = tiny_llava("llava"), processor("llava")
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "original")
    tower = {
        f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in hf_state(model.model.vision_tower).items()
    }
    save_file({**load_file(str(path / "model.safetensors")), **tower}, str(path / "model.safetensors"))
    clip = Path(extra) / "model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(str(clip)).items()}, str(clip))  # the pre-training tower
    img = image(SIZES[0], 10)
    _, (expected,) = hf_features(model, proc, [img])
    (rows,) = (vision := _vision(path, extra)).encode([vision.preprocess(img)])
    assert (rows - expected).abs().max() > 1e-2  # frozen (the config's default): the folder's tower is used
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "unfreeze_mm_vision_tower": True}))
    (rows,) = (vision := _vision(path, extra)).encode([vision.preprocess(img)])
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)


def test_placeholder_count_mismatch_is_a_clear_error(tmp_path):
    model, proc = tiny_llava("llava"), processor("llava")
    path, _ = save_llava(model, proc, tmp_path / "ckpt", "save_pretrained")
    vision = _vision(path)
    rows = torch.zeros(16, TINY_LLAMA["hidden_size"])
    with pytest.raises(InvalidRequest, match="2 image placeholders .* but 1 images"):
        vision.expand([1, IMAGE_TOKEN, 5, IMAGE_TOKEN], [rows], ["h"])
    prepared = vision.expand([1, IMAGE_TOKEN_INDEX, 5], [rows], ["h"])  # RTP-LLM's -200 is accepted too
    assert len(prepared.token_ids) == 18 and prepared.mm_inputs[0].offset == 1
    assert prepared.token_ids[-1] == 5 and prepared.mm_inputs[0].content_hash == "h"


def test_bad_tower_shape_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model, proc = tiny_llava("llava"), processor("llava")
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "original")
    clip = Path(extra) / "model.safetensors"
    tensors = load_file(str(clip))
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(clip))
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.mlp.fc1.weight has shape \(63, 32\)"):
        _vision(path, extra)


# ---- text prompts: <image> in the original layout's text becomes -200 ------------------------------------------


def bos_tokenizer(path: Path):
    """A tiny byte-level BPE that adds BOS (id 1) to every encode, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["USER: what is in this picture? ASSISTANT: a cat on a mat"] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def test_original_text_prompt_image_tag(tmp_path):
    """LLaVA's tokenizer_image_token: pieces between ``<image>`` tags tokenized alone, joined by -200, BOS once;
    then the expanded prompt generates what HF generates."""
    from rtp_mm import LLM, ModelConfig

    model, proc = tiny_llava("llava"), processor("llava", pad=True)
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "original")
    hf_tok = bos_tokenizer(path)
    text = "USER: <image>\nwhat is in this picture? <image> ASSISTANT:"
    pieces = [hf_tok.encode(p) for p in text.split("<image>")]
    assert all(p[0] == 1 for p in pieces)
    expected = [1, *pieces[0][1:], IMAGE_TOKEN_INDEX, *pieces[1][1:], IMAGE_TOKEN_INDEX, *pieces[2][1:]]
    config = ModelConfig(model_type="llava", ckpt_path=str(path), max_seq_len=256, weight_type="FP32")
    with LLM(config, kv_cache_mem_mb=16, extra_data_path=extra) as llm:
        assert llm.encode(text) == expected
        images = [image(SIZES[2], 11), image(SIZES[1], 12)]
        cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True)
        (out,) = llm.generate(text, cfg, images=images)
        chunks = [[1, *pieces[0][1:]], pieces[1][1:], pieces[2][1:]]
        assert out.token_ids == hf_generate(model, proc, chunks, images)


def test_batched_requests_share_the_encoder_cache(tmp_path):
    """Several image prompts in one batch give each one's solo tokens; an image used by several prompts is encoded
    once (later uses are encoder-cache hits)."""
    model, proc = tiny_llava("next", seed=7), processor("next")
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "save_pretrained")
    a, b, c = image(SIZES[1], 20), image(SIZES[2], 21), image(SIZES[3], 22)
    prompts = [[1, IMAGE_TOKEN, 5], [1, IMAGE_TOKEN, 8, IMAGE_TOKEN, 9], [1, 3, IMAGE_TOKEN], [2, IMAGE_TOKEN, 4]]
    images = [[a], [b, a], [c], [a]]
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True)
    with tiny_llm(path, "llava", max_seq_len=256, extra_data_path=extra) as llm:
        together = llm.generate(prompts, cfg, images=images)
        stats = llm.stats()
        assert stats["vision_images_encoded"] == 3 and stats["vision_cache_hits"] == 2, stats
        for prompt, imgs, out in zip(prompts, images, together, strict=True):
            (alone,) = llm.generate([prompt], cfg, images=[imgs])
            assert out.token_ids == alone.token_ids
    assert together[0].token_ids == hf_generate(model, proc, [[1], [5]], [a])


@pytest.mark.parametrize(("image_hw", "grid"), [((50, 130), (2, 5)), ((90, 40), (3, 1)), ((60, 60), (3, 3))])
def test_anyres_max_merge_matches_onevision(image_hw, grid):
    """anyres_max_N (LLaVA-OneVision): the unpadded grid is shrunk bilinearly to about N tiles before the newlines;
    transformers' LlavaOnevisionModel.pack_image_features is the oracle (pinpoints chosen to give ``grid``)."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionModel

    from rtp_mm.vision import llava_merge

    side, hidden, max_tiles = IMAGE // TINY_CLIP["patch_size"], 8, 2
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=IMAGE, patch_size=TINY_CLIP["patch_size"]),
        image_grid_pinpoints=[[grid[0] * IMAGE, grid[1] * IMAGE]],
    )
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1 + grid[0] * grid[1], side * side, hidden, generator=g)
    newline = torch.randn(hidden, generator=g)
    (expected,), _ = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config), [feats], torch.tensor([image_hw]), newline, f"anyres_max_{max_tiles}"
    )
    rows = llava_merge.spatial_unpad(feats[1:], grid, side, image_hw, max_tiles, newline)
    torch.testing.assert_close(torch.cat([feats[0], rows]), expected, atol=1e-6, rtol=0)


def test_half_precision_encoder(tmp_path):
    """The tower and projector run in the LLM's dtype (bf16 here) and return rows in it, close to fp32's."""
    import json

    model, proc = tiny_llava("next", seed=8), processor("next")
    path, _ = save_llava(model, proc, tmp_path / "ckpt", "save_pretrained")
    config = json.loads((path / "config.json").read_text())
    img = image(SIZES[1], 30)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        vision = load_vision_model("llava", str(path), config, "", "cpu", dtype)
        (rows[dtype],) = vision.encode([vision.preprocess(img)])
    assert rows[torch.bfloat16].dtype == torch.bfloat16
    torch.testing.assert_close(rows[torch.bfloat16].float(), rows[torch.float32], atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("projector", "layer", "feature"),
    [("linear", -1, "cls_patch"), ("mlp3x_gelu", 1, "patch"), ("identity", -3, "patch")],
)
@torch.no_grad()
def test_original_projector_types_and_feature_layers(tmp_path, projector, layer, feature):
    """``mm_projector_type`` linear / mlpNx_gelu (Linear, then (GELU, Linear) x N-1) / identity over
    ``hidden_states[mm_vision_select_layer]`` of HF's CLIPVisionModel, CLS kept for cls_patch."""
    import json

    from safetensors.torch import load_file, save_file

    model, proc = tiny_llava("llava", seed=9), processor("llava")
    path, extra = save_llava(model, proc, tmp_path / "ckpt", "original")
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if "mm_projector" not in k}
    g = torch.Generator().manual_seed(4)
    dims = [TINY_CLIP["hidden_size"]] + [TINY_LLAMA["hidden_size"]] * (3 if projector == "mlp3x_gelu" else 1)
    linears = [(torch.randn(o, i, generator=g) * 0.2, torch.randn(o, generator=g)) for i, o in itertools.pairwise(dims)]
    if projector == "linear":
        tensors |= {"model.mm_projector.weight": linears[0][0], "model.mm_projector.bias": linears[0][1]}
    elif projector != "identity":
        for n, (w, b) in enumerate(linears):
            tensors |= {f"model.mm_projector.{2 * n}.weight": w, f"model.mm_projector.{2 * n}.bias": b}
    save_file(tensors, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    fields = dict(mm_projector_type=projector, mm_vision_select_layer=layer, mm_vision_select_feature=feature)
    (path / "config.json").write_text(json.dumps({**config, **fields}))

    img = image(SIZES[2], 40)
    pixels = proc(images=[img], return_tensors="pt")["pixel_values"]
    expected = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][0]
    expected = expected if feature == "cls_patch" else expected[1:]
    for n, (w, b) in enumerate(linears if projector != "identity" else []):
        expected = torch.nn.functional.linear(torch.nn.functional.gelu(expected) if n else expected, w, b)
    vision = _vision(path, extra)
    (rows,) = vision.encode([vision.preprocess(img)])
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)
