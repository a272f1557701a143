"""Checkpoint readers: one read-only view over safetensors, PyTorch ``.bin`` and GGUF weights.

``open_checkpoint(path)`` detects the format of a folder (or a single weight file) and returns a ``Checkpoint``. The
model loader only ever sees tensor names and torch tensors; which file a tensor lives in, and how it is decoded, stays
here. Reading is streaming: at most one shard is open at a time, so a checkpoint larger than memory can be loaded.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import safe_open

from rtp_mm.errors import CheckpointError

# Files a training run leaves beside the weights; never read them as weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt"}
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@runtime_checkable
class Checkpoint(Protocol):
    """A read-only set of named tensors plus the folder's configuration.

    Invariants: ``keys()`` lists every tensor once; ``get(name)`` and ``iter_tensors()`` return torch-shaped tensors
    (``[out, in]`` for linear weights) under exactly those names; ``iter_tensors()`` yields each name once and keeps at
    most one file open; every error about a file is a ``CheckpointError`` naming that file.
    """

    path: Path  # the folder that was opened, or the file when one file was opened (GGUF: always the .gguf file)
    files: list[Path]  # the weight files, in reading order
    format: str  # "safetensors" | "bin" | "gguf"

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def iter_tensors(self, select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]: ...

    def config(self) -> dict: ...

    def generation_config(self) -> dict | None: ...

    def close(self) -> None: ...


def read_json(path: Path) -> dict:
    """Read a JSON object, turning every failure into a CheckpointError that names the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class ShardedCheckpoint:
    """safetensors or PyTorch ``.bin`` weights in one or more files, addressed through ``weight_map``.

    Invariant: ``weight_map`` maps each tensor name to the file holding it, and every file exists. Only the most
    recently used shard is kept open (a ``safe_open`` handle, or a memory-mapped ``torch.load`` result).
    """

    def __init__(self, path: Path, format: str, weight_map: dict[str, Path], shard: tuple[Path, Mapping] | None = None):
        self.path = path
        self.format = format
        self.folder = path if path.is_dir() else path.parent
        self.files = sorted(set(weight_map.values()))
        self._weight_map = weight_map
        self._current: tuple[Path, Mapping] | None = shard  # (file, name -> tensor); at most one

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self._weight_map.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.path}")
        return self._read(self._shard(file), file, name)

    def iter_tensors(self, select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        names_by_file: dict[Path, list[str]] = {file: [] for file in self.files}
        for name, file in self._weight_map.items():
            names_by_file[file].append(name)
        for file, names in names_by_file.items():
            shard = self._shard(file)
            for name in names:
                part = select(name) if select is not None else None
                yield name, self._read(shard, file, name, part)
            self._current = None  # release the shard before the next one is opened

    def config(self) -> dict:
        return read_json(self.folder / "config.json")

    def generation_config(self) -> dict | None:
        path = self.folder / "generation_config.json"
        return read_json(path) if path.is_file() else None

    def close(self) -> None:
        self._current = None

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _shard(self, file: Path) -> Mapping:
        if self._current is None or self._current[0] != file:
            self._current = None
            self._current = (file, _open_shard(file, self.format))
        return self._current[1]

    @staticmethod
    def _read(shard: Mapping, file: Path, name: str, part: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        try:
            if part is not None:
                return read_part(shard, name, part)
            return shard[name]
        except KeyError:
            raise CheckpointError(f"{file}: tensor {name!r} is listed for this file but not in it") from None
        except Exception as exc:  # a corrupt payload surfaces only when the tensor is read
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc})") from None


class _SafetensorsShard(Mapping):
    """A lazy name -> tensor view of one safetensors file (memory-mapped; nothing is read until indexed)."""

    def __init__(self, file: Path):
        try:
            self._handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError: bad or truncated header, file shorter than the header says
            raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None
        self._names = list(self._handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def read_part(self, name: str, dim: int, start: int, stop: int, full: int) -> torch.Tensor:
        """Only rows [start, stop) along ``dim`` are read from the file; the whole tensor when it is not ``full``
        long there."""
        if name not in self._names:
            raise KeyError(name)
        part = self._handle.get_slice(name)
        shape = part.get_shape()
        if dim >= len(shape) or shape[dim] != full:
            return self._handle.get_tensor(name)
        return part[(slice(None),) * dim + (slice(start, stop),)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


Select = Callable[[str], tuple[int, int, int, int] | None]  # name -> (dim, start, stop, full) to read, or None


def read_part(shard: Mapping, name: str, part: tuple[int, int, int, int]) -> torch.Tensor:
    """Rows [start, stop) along ``dim`` of ``name`` (tensor parallelism's slices, llm/models/sharding.py), or the
    whole tensor when it is not ``full`` long there. A memory-mapped ``.bin`` copies only the rows asked for."""
    dim, start, stop, full = part
    if hasattr(shard, "read_part"):
        return shard.read_part(name, dim, start, stop, full)
    tensor = shard[name]
    if dim >= tensor.dim() or tensor.shape[dim] != full:
        return tensor
    return tensor.narrow(dim, start, stop - start).clone()


def _load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    # mmap needs the zip format of torch.save; legacy (pre-1.6) pickles are read whole.
    use_mmap = zipfile.is_zipfile(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as exc:  # truncated zip, bad pickle, or a non-tensor object refused by weights_only
        raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    # Some trainers wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dict of tensors")
    return {name: value for name, value in obj.items() if isinstance(value, torch.Tensor)}


def _open_shard(file: Path, format: str) -> Mapping:
    if not file.is_file():
        raise CheckpointError(f"{file}: weight file not found")
    return _SafetensorsShard(file) if format == "safetensors" else _load_torch_file(file)


def _from_index(index: Path, format: str, path: Path) -> ShardedCheckpoint:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object mapping tensor names to shard files")
    files = {shard: index.parent / shard for shard in set(weight_map.values())}
    missing = sorted(shard for shard, file in files.items() if not file.is_file())
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) that do not exist in {index.parent}: {', '.join(missing)}")
    if format == "safetensors":
        for file in files.values():
            _SafetensorsShard(file)  # validates each header now (cheap), so corruption fails at open time
    return ShardedCheckpoint(path, format, {name: files[shard] for name, shard in weight_map.items()})


def _from_files(files: list[Path], format: str, path: Path) -> ShardedCheckpoint:
    """Unindexed weights: list each file's tensor names (safetensors: headers only; .bin: a memory-mapped load)."""
    weight_map: dict[str, Path] = {}
    shard = None
    for file in files:
        shard = _open_shard(file, format)
        for name in shard:
            if name in weight_map:
                raise CheckpointError(f"tensor {name!r} is in both {weight_map[name]} and {file}")
            weight_map[name] = file
    if not weight_map:
        raise CheckpointError(f"{', '.join(map(str, files))}: no tensors found")
    # With a single file, keep it open: it is the next one to be read.
    return ShardedCheckpoint(path, format, weight_map, (files[0], shard) if len(files) == 1 else None)


def _torch_weight_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES and p.name not in _NOT_WEIGHTS and p.is_file()
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder or weight file, detecting the format.

    Folder preference: ``model.safetensors.index.json``, another ``*.safetensors.index.json``, ``model.safetensors``,
    all ``*.safetensors``; then the same for ``pytorch_model.bin`` and ``*.bin``/``*.pt``/``*.pth``; last a single
    ``*.gguf``.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint path does not exist")
    if path.is_file():
        return _open_file(path)
    for format, stem, suffix in (("safetensors", "model", ".safetensors"), ("bin", "pytorch_model", ".bin")):
        preferred = path / f"{stem}{suffix}.index.json"
        indexes = [preferred] if preferred.is_file() else sorted(path.glob(f"*{suffix}.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files, cannot choose: {', '.join(p.name for p in indexes)}")
        if indexes:
            return _from_index(indexes[0], format, path)
        # The standard single file wins over other files beside it (e.g. Mistral's consolidated.safetensors).
        if (path / f"{stem}{suffix}").is_file():
            return _from_files([path / f"{stem}{suffix}"], format, path)
        files = sorted(path.glob("*.safetensors")) if format == "safetensors" else _torch_weight_files(path)
        if files:
            return _from_files(files, format, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several GGUF files, pass one of them: {', '.join(p.name for p in ggufs)}")
    if ggufs:
        return _open_file(ggufs[0])
    raise CheckpointError(
        f"{path}: no weights found (looked for *.safetensors, *.safetensors.index.json, pytorch_model.bin, "
        "*.bin.index.json, *.bin, *.pt, *.pth, *.gguf)"
    )


def _open_file(file: Path) -> Checkpoint:
    if file.suffix == ".gguf":
        from rtp_mm.llm.loader.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(file)
    if file.suffix == ".safetensors":
        return _from_files([file], "safetensors", file)
    if file.suffix in _TORCH_SUFFIXES:
        return _from_files([file], "bin", file)
    if file.name.endswith(".index.json"):
        return _from_index(file, "safetensors" if ".safetensors." in file.name else "bin", file.parent)
    raise CheckpointError(f"{file}: unknown weight file type; accepted: .safetensors, .bin, .pt, .pth, .gguf")
