"""``rtp-mm build-vit``: ahead-of-time vision builds into the engine cache, for deployment pipelines.

    rtp-mm build-vit --model-type qwen_vl --checkpoint-path /models/Qwen-VL-Chat --precision fp16
    rtp-mm build-vit --model-type llava --checkpoint-path /models/llava --extra-data-path /models/clip --onnx-only

``--onnx-only`` exports the fp32 graph and checks it with onnxruntime against eager torch (batches 1, 3, 8): it needs no
GPU and fills the cache entry that ``VIT_BACKEND=onnxruntime`` runs. Without it the TensorRT engine is built on this
machine's GPU (TensorRT plans only run on the GPU model and TensorRT version that built them). A server started with
the same checkpoint, precision, batch profile and cache path (``TRT_CACHE_PATH``) then finds the entry and starts
without building. The entry's folder and its manifest are printed on success.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rtp_mm.config import check_local_path, trt_cache_path
from rtp_mm.errors import ConfigError
from rtp_mm.model_types import read_config_json, resolve_model_type
from rtp_mm.trt_builders.build import DEFAULT_BATCH_PROFILE, DEFAULT_WORKSPACE_MB, PRECISIONS, VitBuildConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-vit", help="export a vision encoder to ONNX and build its TensorRT engine (cached)")
    p.add_argument("--model-type", required=True, help="llava, qwen_vl or chatglm4v")
    p.add_argument("--checkpoint-path", required=True)
    p.add_argument("--extra-data-path", default="", help="llava: the CLIP tower folder; chatglm4v: vision weights")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp16", help="engine precision (default fp16)")
    lo, opt, hi = DEFAULT_BATCH_PROFILE
    p.add_argument("--min-batch", type=int, default=lo)
    p.add_argument("--opt-batch", type=int, default=opt)
    p.add_argument("--max-batch", type=int, default=hi)
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    p.add_argument("--cache-path", default="", help="default: TRT_CACHE_PATH, else ~/.cache/rtp_mm/trt")
    p.add_argument("--device", default="cuda", help="the GPU that builds (and will run) the engine")
    p.add_argument("--onnx-only", action="store_true", help="export + onnxruntime check only (CPU is enough)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rtp_mm.trt_builders.build import ensure_entry
    from rtp_mm.vision.base import load_vision_model

    info = resolve_model_type(args.model_type, variable="--model-type")
    if not info.vision:
        raise ConfigError(f"--model-type {info.name} has no vision encoder; accepted: llava, qwen_vl, chatglm4v")
    check_local_path(args.checkpoint_path, "--checkpoint-path")
    if args.extra_data_path:
        check_local_path(args.extra_data_path, "--extra-data-path")
    cache_path = args.cache_path or trt_cache_path()
    onnx_only = args.onnx_only
    device = "cpu" if onnx_only else args.device
    cfg = VitBuildConfig(
        model_type=info.name,
        cache_path=Path(cache_path),
        backend="onnxruntime" if onnx_only else "tensorrt",
        precision=args.precision,
        batch_profile=(args.min_batch, args.opt_batch, args.max_batch),
        workspace_mb=args.workspace_mb,
        device=device,
    )
    if not onnx_only:  # fail on a missing TensorRT/GPU before loading weights
        from rtp_mm.trt_builders.tensorrt_engine import cuda_identity, require_tensorrt

        require_tensorrt()
        cuda_identity(device)
    dtype = torch.float32 if onnx_only else PRECISIONS[args.precision]
    config = read_config_json(args.checkpoint_path) or {}
    vision = load_vision_model(info.family, args.checkpoint_path, config, args.extra_data_path, device, dtype)
    if vision is None:
        raise ConfigError(f"--model-type {info.name}: no vision encoder is implemented for family {info.family}")
    say = lambda line: print(f"build-vit: {line}", file=sys.stderr, flush=True)
    folder, manifest = ensure_entry(vision, cfg, log=say, progress=say)
    print(json.dumps({"entry": str(folder), **manifest.as_dict()}, indent=2))
    return 0
