"""Tiny llava models for tests: random ``LlavaForConditionalGeneration`` (LLaVA-1.5) and
``LlavaNextForConditionalGeneration`` (anyres) checkpoints written in the llava-hf and original layouts, and HF's
own feature extraction and greedy generation as the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
)

from rtp_mm_testing.oracle import TINY_LLAMA, perturb, write_checkpoint
from rtp_mm_testing.original_layout import hf_state

IMAGE = 28
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE, patch_size=7
)
PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]  # (height, width), llava-hf's order
IMAGE_TOKEN = TINY_LLAMA["vocab_size"] - 1
NEW_TOKENS = 24
# (width, height): square, wide, tall, small and odd-sized
SIZES = [(40, 40), (90, 33), (31, 77), (17, 23)]


def image(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random picture (noise upscaled), so resizes mix neighbouring pixels as real photos do."""
    g = np.random.default_rng(seed)
    small = Image.fromarray(g.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BILINEAR)


def processor(kind: str, pad: bool = False):
    common = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    if kind == "next":
        return LlavaNextImageProcessor(**common, image_grid_pinpoints=PINPOINTS)
    return LlavaImageProcessor(**common, do_pad=True) if pad else CLIPImageProcessor(**common)


def tiny_llava(kind: str, seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        text_config=LlamaConfig(**TINY_LLAMA),
        vision_config=CLIPVisionConfig(**TINY_CLIP),
        image_token_index=IMAGE_TOKEN,
    )
    if kind == "next":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS))
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    return perturb(model.eval(), std=0.05, seed=seed)


def _t4_name(name: str) -> str:
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    name = name.removeprefix("model.")
    if name.startswith("language_model."):
        return "language_model.model." + name.removeprefix("language_model.")
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _original_name(name: str) -> str | None:
    """transformers-5 name -> LlavaLlamaForCausalLM's (the frozen tower is not in the LLaVA checkpoint)."""
    if name.startswith("model.vision_tower."):
        return None
    name = name.replace("model.language_model.", "model.", 1)
    return name.replace("multi_modal_projector.linear_1.", "mm_projector.0.").replace(
        "multi_modal_projector.linear_2.", "mm_projector.2."
    )


def write_clip_folder(model: torch.nn.Module, proc, path: Path) -> Path:
    """The tower as a released CLIP folder: CLIPVisionConfig, ``vision_model.*`` tensors, preprocessor_config."""
    state = {"vision_model." + k: v for k, v in hf_state(model.model.vision_tower).items()}
    write_checkpoint(path, state, {})
    model.config.vision_config.save_pretrained(str(path))
    proc.save_pretrained(str(path))
    return path


def save_llava(model: torch.nn.Module, proc, path: Path, layout: str) -> tuple[Path, str]:
    """(checkpoint folder, EXTRA_DATA_PATH) of ``model`` in ``layout``."""
    if layout == "save_pretrained":
        model.save_pretrained(str(path))
        proc.save_pretrained(str(path))
        return path, ""
    state, config = hf_state(model), model.config.to_dict()
    if layout in ("transformers4", "transformers5"):
        rename = _t4_name if layout == "transformers4" else (lambda n: n)
        write_checkpoint(path, {rename(k): v for k, v in state.items()}, config)
        proc.save_pretrained(str(path))
        return path, ""
    text = config["text_config"]
    is_next = isinstance(model, LlavaNextForConditionalGeneration)
    pad = getattr(proc, "do_pad", False) and not is_next
    original = {
        **{k: v for k, v in text.items() if k not in ("model_type", "rope_parameters")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "mm_hidden_size": TINY_CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "anyres" if is_next else ("pad" if pad else "square"),
        "mm_patch_merge_type": "spatial_unpad" if is_next else "flat",
        "image_grid_pinpoints": [[w, h] for h, w in PINPOINTS],  # the original reads (width, height)
    }
    tensors = {_original_name(k): v for k, v in state.items() if _original_name(k) is not None}
    write_checkpoint(path, tensors, original)
    return path, str(write_clip_folder(model, proc, path.parent / f"{path.name}-clip"))


@torch.no_grad()
def hf_features(model, proc, images: list[Image.Image]) -> tuple[dict, list[torch.Tensor]]:
    inputs = dict(proc(images=images, return_tensors="pt"))
    out = model.model.get_image_features(**inputs, vision_feature_layer=-2, vision_feature_select_strategy="default")
    feats = out.pooler_output
    feats = list(feats) if isinstance(feats, list | tuple) else list(feats)
    return inputs, feats


@torch.no_grad()
def hf_generate(model, proc, text: list[list[int]], images: list[Image.Image]) -> list[int]:
    """HF greedy tokens; the prompt's image token is repeated once per feature row, as HF's processor does."""
    inputs, feats = hf_features(model, proc, images)
    ids: list[int] = []
    for chunk, rows in zip(text, [*feats, None], strict=True):
        ids += chunk + ([IMAGE_TOKEN] * rows.shape[0] if rows is not None else [])
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        **inputs,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()
