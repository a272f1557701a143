"""Vision backends from the engine cache: find the entry matching this machine and checkpoint, or build it.

``ensure_entry`` is shared by start-up (``VIT_TRT=1`` or ``VIT_BACKEND=onnxruntime``, through ``backend_encode_fn``)
and by the ahead-of-time CLI (``rtp-mm build-vit``). A build exports the visual stack to ONNX and checks it with
onnxruntime against eager torch (``onnx_export``); for TensorRT it then builds the plan, runs it against eager torch on
sample batches across the optimization profile and refuses to cache an engine whose cosine similarity is below
``min_cosine``. Builds of the same key are serialized across processes by a lock file, so two servers starting together
build once.
"""

from __future__ import annotations

import fcntl
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import ConfigError
from rtp_mm.trt_builders.cache import EngineCache, EngineKey, Manifest, weights_sha256
from rtp_mm.trt_builders.onnx_export import ExportOptions, export_onnx, output_error, sample_pixels
from rtp_mm.vision.base import VisionModel
from rtp_mm.vision.inputs import EncodeFn

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BATCH_PROFILE = (1, 8, 16)
DEFAULT_WORKSPACE_MB = 4096
MIN_COSINE = 0.999
ONNX_DIR = "onnx"  # the fp32 graph (+ external weights when > 2 GB)


def precision_name(dtype: torch.dtype) -> str:
    for name, candidate in PRECISIONS.items():
        if candidate == dtype:
            return name
    raise ConfigError(f"vision precision {dtype} is not one of {list(PRECISIONS)}")


@dataclass(frozen=True)
class VitBuildConfig:
    """What to build. ``precision``/``batch_profile``/``device`` apply to TensorRT; an onnxruntime entry is always the
    fp32 graph with a dynamic batch, run on the CPU."""

    model_type: str
    cache_path: Path
    backend: str = "tensorrt"
    precision: str = "fp16"
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    device: str = "cuda"
    min_cosine: float = MIN_COSINE
    export: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise ConfigError(f"vision backend {self.backend!r} is built by nothing; accepted: onnxruntime, tensorrt")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        lo, opt, hi = self.batch_profile
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(f"batch profile min/opt/max = {lo}/{opt}/{hi} must satisfy 1 <= min <= opt <= max")
        if self.workspace_mb < 1:
            raise ConfigError(f"workspace={self.workspace_mb} MiB must be >= 1")


def engine_key(vision: VisionModel, cfg: VitBuildConfig) -> EngineKey:
    """The cache key of this checkpoint's vision stack on this machine (checks TensorRT and the GPU first)."""
    version = gpu = capability = ""
    trt = cfg.backend == "tensorrt"
    if trt:
        from rtp_mm.trt_builders.tensorrt_engine import cuda_identity, require_tensorrt

        version = str(require_tensorrt().__version__)
        gpu, capability = cuda_identity(cfg.device)
    return EngineKey(
        model_type=cfg.model_type,
        backend=cfg.backend,
        weights_sha256=weights_sha256(vision.visual_module()),
        pixel_shape=tuple(vision.pixel_shape()),
        export_options=cfg.export.as_dict(),
        precision=cfg.precision if trt else "fp32",
        batch_profile=cfg.batch_profile if trt else (0, 0, 0),  # 0 = dynamic: the ONNX graph takes any batch
        tensorrt_version=version,
        gpu_name=gpu,
        compute_capability=capability,
    )


def ensure_entry(
    vision: VisionModel,
    cfg: VitBuildConfig,
    log: Callable[[str], None] = logger.info,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Manifest]:
    """The cache entry for ``vision`` under ``cfg``: the matching one, or a new one built now. Never returns an entry
    whose key differs from this machine's (mismatches are logged with what changed, then rebuilt)."""
    key = engine_key(vision, cfg)
    cache = EngineCache(cfg.cache_path)
    found = cache.lookup(key)
    if found.hit:
        log(f"vision {key.backend}: using the cached entry {found.folder}")
        return found.folder, found.manifest  # type: ignore[return-value]
    log(f"vision {key.backend}: building a new entry for {key.model_type} ({'; '.join(found.reasons)})")
    with _build_lock(cache.root, key.folder_name()):
        found = cache.lookup(key)  # another process may have built it while this one waited
        if found.hit:
            return found.folder, found.manifest  # type: ignore[return-value]
        return _build(vision, cfg, key, cache, log, progress)


def _build(
    vision: VisionModel,
    cfg: VitBuildConfig,
    key: EngineKey,
    cache: EngineCache,
    log: Callable[[str], None],
    progress: Callable[[str], None] | None,
) -> tuple[Path, Manifest]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rtp-mm-vit-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / ONNX_DIR).mkdir()
        report = export_onnx(vision, tmp / ONNX_DIR / "vision.onnx", cfg.export)
        log(f"vision {key.backend}: exported ONNX in {report.export_seconds:.1f} s, {report.onnx_bytes / 1e6:.1f} MB")
        if cfg.backend == "tensorrt":
            measured = _build_tensorrt(vision, cfg, tmp, cache, progress)
            log(f"vision tensorrt: engine matches eager torch, cosine {measured['cosine']:.6f}")
        else:
            measured = {
                "reference": "onnxruntime (fp32 graph) vs eager torch fp32",
                "max_abs_err": max(c.max_abs_err for c in report.checks),
                "cosine": min(c.cosine for c in report.checks),
            }
        files = {str(p.relative_to(tmp)): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        return cache.store(key, files, report.as_dict(), measured, time.perf_counter() - start)


def _build_tensorrt(
    vision: VisionModel, cfg: VitBuildConfig, tmp: Path, cache: EngineCache, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    from rtp_mm.trt_builders.tensorrt_engine import BuildSettings, EngineBuildError, TensorRTEncoder, build_engine

    graph = tmp / ONNX_DIR / "vision.onnx"
    if cfg.precision != "fp32":  # strongly typed build: the graph itself carries the precision
        (tmp / f"onnx-{cfg.precision}").mkdir()
        graph = tmp / f"onnx-{cfg.precision}" / "vision.onnx"
        export_onnx(vision, graph, cfg.export, check=False, dtype=PRECISIONS[cfg.precision])
    settings = BuildSettings(
        input_name="pixel_values",
        pixel_shape=tuple(vision.pixel_shape()),
        batch_profile=cfg.batch_profile,
        precision=cfg.precision,
        workspace_bytes=cfg.workspace_mb << 20,
        timing_cache=cache.root / "timing.cache",
    )
    plan = build_engine(graph, settings, progress)
    (tmp / "vision.engine").write_bytes(plan)
    encoder = TensorRTEncoder(plan, cfg.device)
    measured = compare_with_eager(vision, encoder, sorted(set(cfg.batch_profile)))
    if measured["cosine"] < cfg.min_cosine:
        raise EngineBuildError(
            f"the {cfg.precision} TensorRT engine disagrees with eager torch: cosine {measured['cosine']:.6f} < "
            f"{cfg.min_cosine} (max abs error {measured['max_abs_err']:.3g}); not cached. Try --precision fp32"
        )
    return measured


@torch.inference_mode()
def compare_with_eager(
    vision: VisionModel, run: Callable[[torch.Tensor], torch.Tensor], batches: list[int]
) -> dict[str, Any]:
    """``run`` against the eager visual stack (its own dtype and device) on sample batches: the worst max abs error and
    cosine similarity over all batches, plus each batch's."""
    module = vision.visual_module()
    weight = next(module.parameters())
    per_batch = []
    for b in batches:
        x = sample_pixels(tuple(vision.pixel_shape()), b).to(weight.device, weight.dtype)
        want = module(x)
        got = run(x).to(want.device)
        if got.shape != want.shape:
            raise ConfigError(f"backend output {tuple(got.shape)} at batch {b}, eager {tuple(want.shape)}")
        err, cosine = output_error(got, want)
        per_batch.append({"batch": b, "max_abs_err": err, "cosine": cosine})
    return {
        "reference": "backend vs eager torch (its dtype and device)",
        "max_abs_err": max(c["max_abs_err"] for c in per_batch),
        "cosine": min(c["cosine"] for c in per_batch),
        "batches": per_batch,
    }


def backend_encode_fn(vision: VisionModel, cfg: VitBuildConfig, log: Callable[[str], None] = logger.info) -> EncodeFn:
    """The encoder ``encode`` of ``cfg.backend`` (in place of the eager one), from the cache (built now on a miss)."""
    from rtp_mm.trt_builders.ort_backend import OnnxRuntimeEncoder
    from rtp_mm.trt_builders.ort_backend import backend_encode_fn as wrap

    folder, _ = ensure_entry(vision, cfg, log=log, progress=log)
    if cfg.backend == "onnxruntime":
        return wrap(vision, OnnxRuntimeEncoder(folder / ONNX_DIR / "vision.onnx"))
    from rtp_mm.trt_builders.tensorrt_engine import TensorRTEncoder

    return wrap(vision, TensorRTEncoder((folder / "vision.engine").read_bytes(), cfg.device))


@contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
