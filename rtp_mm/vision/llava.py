"""LLaVA's vision stack: CLIP tower -> feature layer(s) -> projector -> (LLaVA-NeXT) tile merge with unpad and
``image_newline``; each ``<image>`` placeholder id of the prompt becomes the image's rows.

Checkpoints in both layouts (see ``settings_from_config``):

- llava-hf (``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``, ``vision_config``): tower and
  ``multi_modal_projector.linear_{1,2}`` in the checkpoint (transformers-4 or -5 names), the image processor from the
  checkpoint's ``preprocessor_config.json``; the placeholder is ``image_token_index``.
- original (``LlavaLlamaForCausalLM``, ``mm_*`` fields): ``model.mm_projector.*`` in the checkpoint, the CLIP tower a
  ``CLIPVisionModel`` folder named by ``EXTRA_DATA_PATH`` (wins, as in RTP-LLM) or ``mm_vision_tower``; when the
  config says the tower was unfrozen (``unfreeze_mm_vision_tower``, ``mm_tunable_parts``), the tower tensors found in
  the checkpoint itself replace the folder's. The placeholder is id -200.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtp_mm.errors import CheckpointError, InvalidRequest
from rtp_mm.llm.engine.multimodal import MultimodalInput, PreparedPrompt
from rtp_mm.vision import llava_merge
from rtp_mm.vision.base import VisionModel
from rtp_mm.vision.clip import ClipVisionSpec, ClipVisionTower, activation, layers_to_run
from rtp_mm.vision.llava_image import ImageProcessing, anyres_images, clip_pixels, expand_to_square
from rtp_mm.vision.llava_image import processing_from_files as _processing

IMAGE_TOKEN_INDEX = -200  # the original LLaVA tokenizer's id for <image>
# Tower tensors: llava-hf transformers 5 (model.vision_tower.X), save_pretrained / transformers 4
# (vision_tower[.vision_model].X), original (model.vision_tower.vision_tower.vision_model.X),
# a CLIP folder (vision_model.X).
_TOWER = re.compile(
    r"(?:(?:model\.)?vision_tower\.(?:vision_tower\.)?)?(?:vision_model\.)?((?:embeddings|pre_layrnorm|encoder)\..+)"
)
_HF_PROJECTOR = re.compile(r"(?:model\.)?multi_modal_projector\.linear_(\d+)\.(weight|bias)")
_ORIGINAL_PROJECTOR = re.compile(r"(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)")
_NEWLINE = re.compile(r"(?:model\.)?image_newline")


@dataclass(frozen=True)
class TiledImage:
    """An anyres image's pixel values: the base view then the tiles [views, 3, S, S], with the best-fit pinpoint
    (height, width) and the original image size (height, width) that the merge (unpad) needs."""

    views: torch.Tensor
    grid_hw: tuple[int, int]
    image_hw: tuple[int, int]


@dataclass(frozen=True)
class LlavaSettings:
    tower: ClipVisionSpec
    processing: ImageProcessing
    feature_layers: tuple[int, ...]
    keep_cls: bool  # "cls_patch" / "full"; LLaVA's default ("patch" / "default") drops the CLS row
    projector_act: str
    merge: str  # flat | spatial | spatial_unpad
    max_tiles: int | None  # anyres_max_N (LLaVA-OneVision): shrink the unpadded grid to about N tiles
    image_token_ids: frozenset[int]
    tower_dir: Path | None  # the CLIP folder (original layout)
    tower_in_checkpoint: bool  # read the tower's tensors from the LLaVA checkpoint, not from tower_dir


class LlavaVisual(nn.Module):
    """The exportable part of LLaVA's stack: CLIP tower -> feature layer(s) -> CLS drop -> projector, so
    [views, 3, S, S] -> [views, rows, llm_hidden]. The tile merge is per-image Python and stays outside."""

    def __init__(
        self,
        tower: ClipVisionTower,
        projector: list[nn.Linear],
        feature_layers: tuple[int, ...],
        keep_cls: bool,
        act: Callable[[torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.tower = tower
        self.projector = nn.ModuleList(projector)
        self.feature_layers = feature_layers
        self.keep_cls = keep_cls
        self.act = act

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.tower(pixels, self.feature_layers)
        if not self.keep_cls:
            feats = feats[:, 1:]
        for i, linear in enumerate(self.projector):
            feats = linear(feats if i == 0 else self.act(feats))
        return feats


class LlavaVision(VisionModel):
    """Invariant: ``encode`` returns, per image, exactly the rows LLaVA's LM reads for one ``<image>``."""

    family = "llava"

    def __init__(
        self, settings: LlavaSettings, tower: ClipVisionTower, projector: list[nn.Linear], newline: torch.Tensor | None
    ):
        self.settings = settings
        act = activation(settings.projector_act, "projector activation")
        self.visual = LlavaVisual(tower, projector, settings.feature_layers, settings.keep_cls, act)
        self.newline = newline

    def preprocess(self, image: Any) -> torch.Tensor | TiledImage:  # type: ignore[override]
        proc = self.settings.processing
        image = image.convert("RGB")
        if proc.aspect == "anyres":
            views, grid = anyres_images(image, proc)
            pixels = torch.stack([clip_pixels(v, proc) for v in views])
            return TiledImage(pixels, grid, (image.height, image.width))
        if proc.aspect == "pad":
            image = expand_to_square(image, proc.mean)
        return clip_pixels(image, proc)

    def visual_module(self) -> LlavaVisual:
        return self.visual

    def pixel_shape(self) -> tuple[int, int, int]:
        spec = self.settings.tower
        return (spec.num_channels, spec.image_size, spec.image_size)

    def stack(self, pixel_values: list[torch.Tensor | TiledImage]) -> torch.Tensor:  # type: ignore[override]
        weight = self.visual.tower.embeddings.patch_embedding.weight
        return torch.cat([_views(p) for p in pixel_values]).to(weight.device, weight.dtype)

    def unstack(  # type: ignore[override]
        self, pixel_values: list[torch.Tensor | TiledImage], features: torch.Tensor
    ) -> list[torch.Tensor]:
        per_image = features.split([_views(p).shape[0] for p in pixel_values])
        return [self._merge(p, f) for p, f in zip(pixel_values, per_image, strict=True)]

    def _merge(self, pixels: torch.Tensor | TiledImage, feats: torch.Tensor) -> torch.Tensor:
        """[views, rows, hidden] of one image -> its [n, hidden] rows."""
        s = self.settings
        if not isinstance(pixels, TiledImage) or s.merge == "flat":
            rows = feats.flatten(0, 1)
            if s.merge == "spatial_unpad" and self.newline is not None:
                rows = torch.cat([rows, self.newline[None].to(rows.dtype)])
            return rows
        side, size = s.tower.patches_per_side, s.tower.image_size
        grid = (pixels.grid_hw[0] // size, pixels.grid_hw[1] // size)
        tiles = feats[1:]
        if grid[0] * grid[1] != tiles.shape[0] or tiles.shape[1] != side * side:
            raise CheckpointError(
                f"anyres: {tiles.shape[0]} tiles of {tiles.shape[1]} rows do not form a {grid} grid of {side}x{side} "
                f"(processor tile size {s.processing.tile_size}, tower image_size {size})"
            )
        if s.merge == "spatial":
            return torch.cat([feats[0], llava_merge.spatial(tiles, grid, side)])
        unpadded = llava_merge.spatial_unpad(tiles, grid, side, pixels.image_hw, s.max_tiles, self.newline)
        return torch.cat([feats[0], unpadded])

    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        spots = [i for i, t in enumerate(prompt_ids) if t in self.settings.image_token_ids]
        if len(spots) != len(embeds):
            ids = sorted(self.settings.image_token_ids)
            raise InvalidRequest(
                f"the prompt has {len(spots)} image placeholders (<image>, token id {' or '.join(map(str, ids))}) "
                f"but {len(embeds)} images were given"
            )
        token_ids: list[int] = []
        mm_inputs: list[MultimodalInput] = []
        start = 0
        for spot, rows, content_hash in zip(spots, embeds, hashes, strict=True):
            token_ids += prompt_ids[start:spot]
            mm_inputs.append(MultimodalInput(embeds=rows, offset=len(token_ids), content_hash=content_hash))
            token_ids += [prompt_ids[spot]] * rows.shape[0]
            start = spot + 1
        return PreparedPrompt(token_ids + prompt_ids[start:], mm_inputs)

    def image_placeholder(self, index: int) -> str:
        return "<image>"


def _views(pixels: torch.Tensor | TiledImage) -> torch.Tensor:
    """One image's rows of the visual batch: [views, 3, S, S] (one view unless anyres)."""
    return pixels.views if isinstance(pixels, TiledImage) else pixels[None]


# ---- settings from the two config layouts -----------------------------------------------------------------------


def settings_from_config(ckpt_path: str, config: dict[str, Any], extra_data_path: str) -> LlavaSettings:
    if "vision_config" in config:
        return _hf_settings(ckpt_path, config)
    return _original_settings(config, extra_data_path)


def _hf_settings(ckpt_path: str, config: dict[str, Any]) -> LlavaSettings:
    tower = ClipVisionSpec.from_hf(config["vision_config"] or {})
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"config.json vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
    is_next = config.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in (
        config.get("architectures") or []
    )
    overrides: dict[str, Any] = {}
    if is_next:
        pinpoints = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        overrides = dict(aspect="anyres", grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints))
    layer = config.get("vision_feature_layer", -2)
    token = config.get("image_token_index", config.get("image_token_id", 32000))
    return LlavaSettings(
        tower=tower,
        processing=_processing(ckpt_path, tower.image_size, **overrides),
        feature_layers=(layer,) if isinstance(layer, int) else tuple(layer),
        keep_cls=strategy == "full",
        projector_act=config.get("projector_hidden_act", "gelu"),
        merge="spatial_unpad" if is_next else "flat",
        max_tiles=None,
        image_token_ids=frozenset({int(token), IMAGE_TOKEN_INDEX}),
        tower_dir=None,
        tower_in_checkpoint=True,
    )


def _original_settings(config: dict[str, Any], extra_data_path: str) -> LlavaSettings:
    from transformers import CLIPVisionConfig

    tower_dir = _tower_dir(config, extra_data_path)
    tower = ClipVisionSpec.from_hf(CLIPVisionConfig.from_pretrained(str(tower_dir)).to_dict())
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"config.json mm_vision_select_feature={feature!r}: expected 'patch' or 'cls_patch'")
    aspect = str(config.get("image_aspect_ratio") or "square")
    max_tiles = None
    overrides: dict[str, Any] = {"aspect": "pad" if aspect == "pad" else "square"}
    if aspect.startswith("anyres"):
        found = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
        if found is None:
            raise CheckpointError(f"config.json image_aspect_ratio={aspect!r} (expected pad, anyres, anyres_max_N)")
        max_tiles = int(found.group(1)) if found.group(1) else None
        base = _processing(tower_dir, tower.image_size)
        overrides = dict(aspect="anyres", grid_pinpoints=_original_pinpoints(config, base.tile_size))
    merge = str(config.get("mm_patch_merge_type") or "flat")
    if merge not in ("flat", "spatial", "spatial_unpad"):
        raise CheckpointError(f"config.json mm_patch_merge_type={merge!r} (expected flat, spatial, spatial_unpad)")
    projector = str(config.get("mm_projector_type") or "linear")
    if projector != "linear" and projector != "identity" and not re.fullmatch(r"mlp\d+x_gelu", projector):
        raise CheckpointError(f"config.json mm_projector_type={projector!r} (expected linear, mlpNx_gelu, identity)")
    return LlavaSettings(
        tower=tower,
        processing=_processing(tower_dir, tower.image_size, **overrides),
        feature_layers=(int(config.get("mm_vision_select_layer", -2)),),
        keep_cls=feature == "cls_patch",
        projector_act="gelu",
        merge=merge,
        max_tiles=max_tiles,
        image_token_ids=frozenset({IMAGE_TOKEN_INDEX}),
        tower_dir=tower_dir,
        # RTP-LLM's rule: the checkpoint's tower tensors count only when training unfroze the tower.
        tower_in_checkpoint=bool(config.get("unfreeze_mm_vision_tower"))
        or "mm_vision_tower" in str(config.get("mm_tunable_parts") or ""),
    )


def _tower_dir(config: dict[str, Any], extra_data_path: str) -> Path:
    """EXTRA_DATA_PATH when set (RTP-LLM: that path wins), else the local folder config.json names."""
    if extra_data_path:
        if not Path(extra_data_path).is_dir():
            raise CheckpointError(f"EXTRA_DATA_PATH={extra_data_path!r} is not a folder (a CLIPVisionModel folder)")
        return Path(extra_data_path)
    named = config.get("mm_vision_tower") or config.get("vision_tower")
    if named and Path(named).is_dir():
        return Path(named)
    raise CheckpointError(
        f"MODEL_TYPE=llava: the CLIP vision tower mm_vision_tower={named!r} is not a local folder; set "
        "EXTRA_DATA_PATH to a CLIPVisionModel folder (config.json and weights)"
    )


def _original_pinpoints(config: dict[str, Any], tile: int) -> tuple[tuple[int, int], ...]:
    """The original's pinpoints are (width, height) pairs, or LLaVA-OneVision's "(1x1),...,(6x6)" tile ranges."""
    raw = config.get("image_grid_pinpoints")
    if isinstance(raw, str):
        ranges = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", raw)]
        if len(ranges) < 2:
            raise CheckpointError(f"config.json image_grid_pinpoints={raw!r}: expected '(AxB),...,(CxD)'")
        (a0, a1), (b0, b1) = ranges[0], ranges[-1]
        raw = [[i * tile, j * tile] for i in range(a0, b0 + 1) for j in range(a1, b1 + 1)]
    if not raw:
        raise CheckpointError("config.json image_aspect_ratio anyres needs image_grid_pinpoints")
    return tuple((int(h), int(w)) for w, h in raw)


# ---- weights --------------------------------------------------------------------------------------------------


def load_llava(
    ckpt_path: str, config: dict[str, Any], extra_data_path: str, device: str, dtype: torch.dtype
) -> LlavaVision:
    from rtp_mm.llm.loader import open_checkpoint

    settings = settings_from_config(ckpt_path, config, extra_data_path)
    with open_checkpoint(ckpt_path) as ckpt:
        tower_state = _matching(ckpt, _TOWER) if settings.tower_in_checkpoint else {}
        hf = "vision_config" in config
        projector_state = _matching(ckpt, _HF_PROJECTOR if hf else _ORIGINAL_PROJECTOR, whole=True)
        newline = [ckpt.get(k) for k in ckpt.keys() if _NEWLINE.fullmatch(k)]
    if not tower_state and settings.tower_dir is not None:
        with open_checkpoint(settings.tower_dir) as clip:
            tower_state = _matching(clip, _TOWER)
    tower = ClipVisionTower(settings.tower, layers_to_run(settings.tower, settings.feature_layers))
    _load(tower, tower_state, "CLIP vision tower", ignore=("embeddings.position_ids",))  # old CLIP buffers
    projector = _projector(projector_state, settings, config, hf)
    if settings.merge == "spatial_unpad" and not newline:
        raise CheckpointError("mm_patch_merge_type spatial_unpad (LLaVA-NeXT) needs the image_newline tensor")
    model = LlavaVision(settings, tower, projector, newline[0] if newline else None)
    model.visual.to(device=device, dtype=dtype).eval()
    if model.newline is not None:
        model.newline = model.newline.to(device=device, dtype=dtype)
    return model


def _matching(ckpt: Any, pattern: re.Pattern[str], whole: bool = False) -> dict[str, torch.Tensor]:
    """Tensors whose names match ``pattern``, keyed by its first group (``whole``: by the full match's groups)."""
    out = {}
    for name in ckpt.keys():
        m = pattern.fullmatch(name)
        if m is not None:
            out[".".join(g or "" for g in m.groups()) if whole else m.group(1)] = ckpt.get(name)
    return out


def _load(module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    expected = module.state_dict()
    used = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(used))
    if missing:
        raise CheckpointError(f"{what}: missing tensors {missing[:4]} ({len(missing)} in all)")
    unknown = [k for k in state if k not in expected and not k.startswith(ignore)]
    extra_layers = [k for k in unknown if k.startswith("encoder.layers.")]  # layers past the feature layer
    if len(unknown) != len(extra_layers):
        raise CheckpointError(f"{what}: unexpected tensors {sorted(set(unknown) - set(extra_layers))[:4]}")
    for name, tensor in used.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{what}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    module.load_state_dict(used, strict=True)


def _projector(state: dict[str, torch.Tensor], s: LlavaSettings, config: dict[str, Any], hf: bool) -> list[nn.Linear]:
    """The projector's Linear layers in order (an activation sits between consecutive ones)."""
    if hf:
        count = 2
        names = [(f"{i}.weight", f"{i}.bias") for i in (1, 2)]
    else:
        kind = str(config.get("mm_projector_type") or "linear")
        if kind == "identity":
            return []
        count = 1 if kind == "linear" else int(kind[3 : kind.index("x")])
        names = (
            [(".weight", ".bias")] if kind == "linear" else [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(count)]
        )
    linears = []
    for weight_name, bias_name in names[:count]:
        if weight_name not in state:
            raise CheckpointError(f"projector tensor {weight_name!r} is missing (found {sorted(state)[:6]})")
        w = state[weight_name]
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias_name in state)
        with torch.no_grad():
            linear.weight.copy_(w)
            if linear.bias is not None:
                linear.bias.copy_(state[bias_name])
        linears.append(linear)
    return linears
