"""A stand-in for the ``tensorrt`` module on machines without TensorRT or a GPU.

It implements the slice of the TensorRT 10/11 Python API that ``rtp_mm.trt_builders.tensorrt_engine`` calls, with the
same call sequence and contracts: the ONNX parser really parses the file (onnx), the "plan" is the ONNX model plus its
optimization profile, and an execution context runs it with onnxruntime on the CPU, reading and writing tensors
through the raw addresses given to ``set_tensor_address`` (so the encoder's pointer, shape and dtype handling is
exercised for real). ``BUILDS`` counts builds; ``OUTPUT_NOISE`` corrupts outputs to test the cosine gate.
It proves the wiring, not TensorRT itself: tests marked ``gpu`` run the real library.
"""

from __future__ import annotations

import ctypes
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

__version__ = "10.99.0"
BUILDS: list[dict[str, Any]] = []
OUTPUT_NOISE = 0.0


class Logger:
    WARNING = 2

    def __init__(self, severity: int = WARNING):
        self.severity = severity


DataType = SimpleNamespace(FLOAT="float32", HALF="float16", BF16="bfloat16", INT32="int32", INT64="int64")
NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
MemoryPoolType = SimpleNamespace(WORKSPACE=0)
BuilderFlag = SimpleNamespace(TF32=7)
TensorIOMode = SimpleNamespace(INPUT=1, OUTPUT=2)
_ONNX_DTYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 6: DataType.INT32, 7: DataType.INT64}


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.onnx_path: Path | None = None


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            onnx.checker.check_model(path)
        except Exception as e:  # noqa: BLE001 - the real parser reports any failure as errors
            self.errors.append(str(e))
            return False
        self.network.onnx_path = Path(path)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+"


class _Config:
    def __init__(self) -> None:
        self.pools: dict[int, int] = {}
        self.cleared: set[int] = set()
        self.profiles: list[_Profile] = []
        self.timing: _TimingCache | None = None
        self.progress_monitor: IProgressMonitor | None = None

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self.pools[pool] = size

    def clear_flag(self, flag: int) -> None:
        self.cleared.add(flag)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.timing is not None
        return self.timing


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def create_builder_config(self) -> _Config:
        return _Config()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        assert network.onnx_path is not None and len(config.profiles) == 1
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            monitor.phase_start("Tactic selection", "Building engine", 3)
            for step in range(3):
                assert monitor.step_complete("Tactic selection", step)
            monitor.phase_finish("Tactic selection")
            monitor.phase_finish("Building engine")
        ((name, shapes),) = config.profiles[0].shapes.items()
        BUILDS.append(
            {
                "flags": network.flags,
                "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                "cleared": set(config.cleared),
                "timing_cache": config.timing.data if config.timing else None,
                "onnx": network.onnx_path,
            }
        )
        return pickle.dumps({"onnx": network.onnx_path.read_bytes(), "input": name, "profile": shapes})


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
        try:
            return _Engine(pickle.loads(plan))
        except (pickle.UnpicklingError, KeyError, EOFError):
            return None


class _Engine:
    def __init__(self, plan: dict[str, Any]):
        import onnx
        import onnxruntime as ort

        model = onnx.load_from_string(plan["onnx"])
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profile = plan["profile"]
        self.names = [model.graph.input[0].name, model.graph.output[0].name]
        self.dtypes = {
            v.name: _ONNX_DTYPES[v.type.tensor_type.elem_type] for v in (model.graph.input[0], model.graph.output[0])
        }
        assert plan["input"] == self.names[0]

    @property
    def num_io_tensors(self) -> int:
        return 2

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> int:
        return TensorIOMode.INPUT if name == self.names[0] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple:
        assert name == self.names[0] and index == 0
        return self.profile

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.input_shape: tuple | None = None
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        low, _, high = self.engine.profile
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            return False
        self.input_shape = tuple(shape)
        return True

    def _output(self) -> np.ndarray:
        name, dtype = self.engine.names[0], self.engine.dtypes[self.engine.names[0]]
        count = int(np.prod(self.input_shape))
        buf = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.addresses[name])
        x = np.frombuffer(buf, dtype=dtype).reshape(self.input_shape).copy()
        return self.engine.session.run(None, {name: x})[0]

    def get_tensor_shape(self, name: str) -> tuple:
        assert name == self.engine.names[1] and self.input_shape is not None
        rows_hidden = self.engine.session.get_outputs()[0].shape[1:]
        return (self.input_shape[0], *rows_hidden)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        out = self._output()
        if OUTPUT_NOISE:
            out = out + OUTPUT_NOISE * np.random.default_rng(0).standard_normal(out.shape).astype(out.dtype)
        out = np.ascontiguousarray(out.astype(self.engine.dtypes[self.engine.names[1]]))
        ctypes.memmove(self.addresses[self.engine.names[1]], out.ctypes.data, out.nbytes)
        return True


# The fields of an engine-cache manifest's key (what makes a cached engine reusable).
MANIFEST_FIELDS = {
    "model_type",
    "backend",
    "weights_sha256",
    "pixel_shape",
    "export_options",
    "precision",
    "batch_profile",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "export_format_version",
}
