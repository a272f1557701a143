"""Everything that calls TensorRT: the only module that imports ``tensorrt`` (10 or newer), and only inside functions,
so rtp-mm imports and runs on machines without it.

- ``require_tensorrt`` / ``cuda_identity``: the start-up checks of ``VIT_TRT=1``, each failing with what is missing and
  how to proceed (never a silent fallback to PyTorch).
- ``build_engine``: ONNX file -> serialized plan, with the ONNX parser on an explicit-batch network, one optimization
  profile over the batch axis, a workspace limit, a persistent timing cache and a progress display.
- ``TensorRTEncoder``: runs a plan on torch CUDA tensors.

Precision is carried by the graph, not by builder flags. TensorRT 11 removed the weak-typing flags
(``BuilderFlag.FP16``/``BF16``) and TensorRT 10 already builds strongly typed networks
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so an fp16/bf16 engine is built from the visual stack exported in
that dtype, and the same code builds the same engine on both versions. fp32 builds also switch TF32 off, so "fp32"
means fp32.

CUDA: torch already owns the CUDA context, memory and streams of the process, so the engine reads and writes torch CUDA
tensors through their raw pointers (``set_tensor_address``) and is enqueued on torch's current stream
(``execute_async_v3``); results are ordered with the caller's later torch work on that stream, without a host sync and
without a second CUDA library (pycuda / cuda-python) or context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtp_mm.errors import ConfigError, RtpMmError

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = (
    "install TensorRT 10 or newer for this machine's CUDA (pip install 'rtp-mm[trt]', which pulls tensorrt>=10) on a "
    "machine with an NVIDIA GPU, or unset VIT_TRT to run the vision encoder in PyTorch"
)


class TensorRTUnavailable(ConfigError):
    """VIT_TRT=1 cannot work on this machine: TensorRT or a CUDA GPU is missing."""


class EngineBuildError(RtpMmError):
    """TensorRT could not parse, build or deserialize an engine, or the engine's output disagrees with eager torch."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its shared libraries are not
        raise TensorRTUnavailable(
            f"VIT_TRT=1: the tensorrt Python package cannot be imported ({e}); {INSTALL_HINT}"
        ) from None
    version = str(getattr(trt, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(f"VIT_TRT=1: TensorRT {version} is installed, rtp-mm needs 10+; {INSTALL_HINT}")
    return trt


def cuda_identity(device: str | torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``, or TensorRTUnavailable when it is not a CUDA GPU."""
    dev = torch.device(device)
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"VIT_TRT=1 needs an NVIDIA GPU, but torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA {torch.version.cuda or 'none'}); {INSTALL_HINT}"
        )
    if dev.type != "cuda":
        raise TensorRTUnavailable(f"VIT_TRT=1 runs the vision encoder on a CUDA GPU, but DEVICE={dev}; set DEVICE=cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


@dataclass(frozen=True)
class BuildSettings:
    input_name: str
    pixel_shape: tuple[int, int, int]  # one batch row: (3, H, W)
    batch_profile: tuple[int, int, int]  # min, opt, max of the batch axis
    precision: str  # fp32 | fp16 | bf16: recorded; the ONNX graph's dtypes decide (strongly typed)
    workspace_bytes: int
    timing_cache: Path | None = None  # read before and written after the build: later builds skip kernel timing


def build_engine(onnx_path: Path, settings: BuildSettings, progress: Callable[[str], None] | None = None) -> bytes:
    """Parse ``onnx_path`` (external weights beside it are found by path) and build a serialized plan."""
    trt = require_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if settings.precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)
    lo, opt, hi = settings.batch_profile
    profile = builder.create_optimization_profile()
    shape = tuple(settings.pixel_shape)
    profile.set_shape(settings.input_name, (lo, *shape), (opt, *shape), (hi, *shape))
    config.add_optimization_profile(profile)
    timing = settings.timing_cache
    cache_bytes = timing.read_bytes() if timing is not None and timing.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    if progress is not None:
        config.progress_monitor = _progress_monitor(trt, progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (batch profile {lo}/{opt}/{hi}, "
            f"workspace {settings.workspace_bytes >> 20} MiB); TensorRT's log above says why"
        )
    if settings.timing_cache is not None:
        settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = settings.timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        tmp.replace(settings.timing_cache)
    return bytes(memoryview(plan))


def _progress_monitor(trt: Any, report: Callable[[str], None]) -> Any:
    """A ``trt.IProgressMonitor`` printing each build phase and, at most once a second, its step count."""

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}
            self.last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.steps[phase_name] = num_steps
            report(f"{'  ' * self.depth[phase_name]}{phase_name} (0/{num_steps})")

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self.last >= 1.0:
                self.last = now
                indent = "  " * self.depth.get(phase_name, 0)
                report(f"{indent}{phase_name} ({step + 1}/{self.steps.get(phase_name, '?')})")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.depth.pop(phase_name, None)
            self.steps.pop(phase_name, None)

    return Progress()


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if dtype not in table:
        raise EngineBuildError(f"engine I/O dtype {dtype} is not one rtp-mm feeds (float32/16, bfloat16, int32/64)")
    return table[dtype]


class TensorRTEncoder:
    """A deserialized plan as ``pixels [N, 3, H, W] -> features [N, rows, hidden]``. N larger than the profile's max
    batch is split; a chunk below its min batch is zero-padded. One execution context, so calls are serialized.

    Invariant: inputs are cast to the engine's input dtype and device; outputs stay in the engine's output dtype."""

    def __init__(self, plan: bytes, device: str | torch.device):
        trt = require_tensorrt()
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineBuildError(
                f"TensorRT {trt.__version__} could not deserialize the engine (built by another TensorRT version or "
                "for another GPU?); delete the cache entry or rebuild with `rtp-mm build-vit`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineBuildError(f"a vision engine has one input and one output, this one has {inputs} / {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.device = torch.device(device)
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._run(chunk) for chunk in pixels.split(self.max_batch)])

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        x = chunk.to(self.device, self.input_dtype)
        if n < self.min_batch:
            x = torch.cat([x, x.new_zeros((self.min_batch - n, *x.shape[1:]))])
        x = x.contiguous()
        with self._lock:
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise EngineBuildError(f"input shape {tuple(x.shape)} is outside the engine's optimization profile")
            out = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=self.device
            )
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
            if not self.context.execute_async_v3(stream):
                raise EngineBuildError("TensorRT failed to enqueue the vision engine (see TensorRT's log)")
        return out[:n]
