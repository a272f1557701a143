"""A minimal GGUF parser: header, scalar metadata, tensor infos, and tensor data as views of one memory map.

gguf-py's ``GGUFReader`` decodes every element of every metadata array into numpy views; the default model's
49152-token vocabulary and its merges make that ~3 s, most of rtp-mm's start-up. rtp-mm needs only scalar metadata
and the tensors (its tokenizer is converted once from the GGUF by transformers and cached), so arrays are stepped
over and left undecoded here. Tensors come out as gguf-py shapes them, so gguf-py's decoders still apply: float and
integer types in torch order (GGUF dims reversed), block-quantized types (and BF16) as raw bytes
``[..., bytes per row]``. Layout reference: the GGUF specification in the ggml repository.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    data: np.ndarray  # read-only view of the file


class GGUFArray:
    """Marker for a metadata array that was stepped over (its element type and length are kept)."""

    def __init__(self, element_type: int, length: int):
        self.element_type, self.length = element_type, length


class GGUFFile:
    """Invariant: ``tensors`` are in file order and every ``data`` view lies inside the mapped file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._pos = 0
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise ValueError("bad magic: not a GGUF file")
        self._pos = 4
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2, 3)")
        num_tensors, num_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, data_start + offset) for name, dims, kind, offset in infos]

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        end = self._pos + length
        if end > len(self._map):
            raise ValueError("truncated string")
        text = bytes(self._map[self._pos : end]).decode("utf-8", errors="replace")
        self._pos = end
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            element_type, length = self._scalar("<I"), self._scalar("<Q")
            if element_type == _STRING:
                for _ in range(length):
                    self._pos += 8 + struct.unpack_from("<Q", self._map, self._pos)[0]
            elif element_type == _ARRAY:
                for _ in range(length):
                    self._value(_ARRAY)
            else:
                self._pos += length * struct.calcsize(_SCALAR_FORMATS[element_type])
            return GGUFArray(element_type, length)
        fmt = _SCALAR_FORMATS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._scalar(fmt)

    def _tensor(self, name: str, dims: list[int], kind: int, start: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(kind)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        count = int(np.prod(dims)) if dims else 1
        nbytes = count // block_size * type_size
        if start + nbytes > len(self._map):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated)")
        raw = self._map[start : start + nbytes]
        numpy_type = _NUMPY_TYPES.get(qtype.name)
        if numpy_type is not None:
            data = raw.view(numpy_type).reshape(shape)
        else:  # block-quantized (and BF16): raw bytes per row
            data = raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)
        return GGUFTensor(name, qtype, shape, data)


_NUMPY_TYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}
