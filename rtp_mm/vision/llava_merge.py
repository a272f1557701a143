"""LLaVA-NeXT's arrangement of an anyres image's tile features into rows (after the base view's rows).

``spatial``: the tiles' patch grids laid out as one big grid, read row by row. ``spatial_unpad``: the same grid,
cropped back to the image's own aspect ratio (the padding added by the preprocessor is removed), optionally shrunk
to about N tiles (``anyres_max_N``), with ``image_newline`` appended after every grid row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _grid(tiles: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """[tiles, side*side, hidden] (tiles row-major) -> [hidden, rows*side, cols*side]."""
    rows, cols = grid
    x = tiles.view(rows, cols, side, side, -1)
    return x.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)


def spatial(tiles: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    return _grid(tiles, grid, side).flatten(1, 2).transpose(0, 1)


def unpad(features: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Crop [hidden, H, W] to the image's aspect ratio. The rounding to 7 digits keeps a float product such as
    9.9999999 from truncating to 9 (the later form of the original helper, the one transformers uses)."""
    height, width = image_hw
    cur_h, cur_w = features.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return features[:, pad : cur_h - pad, :]
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return features[:, :, pad : cur_w - pad]


def spatial_unpad(
    tiles: torch.Tensor,
    grid: tuple[int, int],
    side: int,
    image_hw: tuple[int, int],
    max_tiles: int | None,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    x = unpad(_grid(tiles, grid, side), image_hw)
    if max_tiles is not None:
        c, h, w = x.shape
        times = math.sqrt(h * w / (max_tiles * side**2))
        if times > 1.1:  # LLaVA-OneVision: bilinear shrink of an over-large grid
            x = F.interpolate(x[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    if newline is not None:
        x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1).to(x.dtype)], dim=-1)
    return x.flatten(1, 2).transpose(0, 1)
