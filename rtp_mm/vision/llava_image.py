"""LLaVA's image preprocessing with Pillow: CLIPImageProcessor's resize / center-crop / normalise, LLaVA-1.5's
``pad`` (expand to a square filled with the mean colour) and LLaVA-NeXT's ``anyres`` (best-fit grid, tiles + a
squashed base image). Every resize is a Pillow resize of the uint8 image, as in the original code, so pixel values
match the reference processors to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.loader import read_json
from rtp_mm.vision.base import CLIP_MEAN, CLIP_STD, normalize_pixels

ASPECTS = ("square", "pad", "anyres")


@dataclass(frozen=True)
class ImageProcessing:
    """A CLIPImageProcessor's settings plus LLaVA's aspect mode. ``grid_pinpoints`` are (height, width) pairs."""

    shortest_edge: int | None  # resize the short side to this (aspect kept); None: resize to (height, width)
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None  # center crop; None: no crop
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    aspect: str = "square"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.aspect not in ASPECTS:
            raise CheckpointError(f"image aspect mode {self.aspect!r} is not supported ({', '.join(ASPECTS)})")
        if self.aspect == "anyres" and not self.grid_pinpoints:
            raise CheckpointError("image_aspect_ratio anyres needs image_grid_pinpoints in config.json")

    @property
    def tile_size(self) -> int:
        """Side of an anyres tile: the crop height (the original's ``crop_size['height']``)."""
        if self.crop_hw is not None:
            return self.crop_hw[0]
        return self.shortest_edge if self.shortest_edge is not None else self.resize_hw[0]  # type: ignore[index]


def processing_from_files(folder: str | Path | None, image_size: int, **overrides: Any) -> ImageProcessing:
    """Settings from ``folder/preprocessor_config.json`` when present, else CLIP's defaults for ``image_size``."""
    file = Path(folder) / "preprocessor_config.json" if folder else None
    cfg = read_json(file) if file is not None and file.is_file() else {}
    size = cfg.get("size", {"shortest_edge": image_size})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = cfg.get("crop_size", {"height": image_size, "width": image_size})
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    settings: dict[str, Any] = dict(
        shortest_edge=size.get("shortest_edge"),
        resize_hw=(size["height"], size["width"]) if "height" in size else None,
        crop_hw=(crop["height"], crop["width"]) if cfg.get("do_center_crop", True) else None,
        mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
        std=tuple(cfg.get("image_std", CLIP_STD)),
        resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
    )
    if cfg.get("do_pad") and cfg.get("image_processor_type", "").startswith("LlavaImageProcessor"):
        settings["aspect"] = "pad"
    if cfg.get("image_grid_pinpoints"):
        settings["grid_pinpoints"] = tuple(tuple(p) for p in cfg["image_grid_pinpoints"])
    settings.update(overrides)
    return ImageProcessing(**settings)


def clip_pixels(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    """CLIPImageProcessor on one RGB image -> [3, H, W] float32."""
    if proc.shortest_edge is not None:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(proc.shortest_edge * long / short)
        size = (proc.shortest_edge, new_long) if w <= h else (new_long, proc.shortest_edge)
    else:
        size = (proc.resize_hw[1], proc.resize_hw[0])  # type: ignore[index]
    image = image.resize(size, resample=proc.resample)
    if proc.crop_hw is not None:
        ch, cw = proc.crop_hw
        w, h = image.size
        if ch > h or cw > w:
            raise CheckpointError(f"center crop {proc.crop_hw} is larger than the resized image {(h, w)}")
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return normalize_pixels(image, proc.mean, proc.std)


def expand_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square canvas of the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) pinpoint keeping the most of the image's pixels, then wasting the fewest."""
    best, best_effective, best_wasted = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def anyres_images(image: Image.Image, proc: ImageProcessing) -> tuple[list[Image.Image], tuple[int, int]]:
    """LLaVA-NeXT's views of one image: the whole image squashed to one tile, then the tiles (row-major) of the
    image resized (aspect kept) and centred with black padding onto the best-fit pinpoint. Also returns that
    pinpoint (height, width)."""
    w, h = image.size
    th, tw = best_resolution(h, w, proc.grid_pinpoints)
    scale_w, scale_h = tw / w, th / h  # the float expressions of the original: ceil() sees their rounding
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    canvas = Image.new(image.mode, (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), resample=proc.resample), ((tw - nw) // 2, (th - nh) // 2))
    t = proc.tile_size
    tiles = [canvas.crop((x, y, x + t, y + t)) for y in range(0, th, t) for x in range(0, tw, t)]
    side = proc.shortest_edge if proc.shortest_edge is not None else t
    return [image.resize((side, side), resample=proc.resample), *tiles], (th, tw)
