"""Read a sharded checkpoint with several worker processes (``LOAD_CKPT_NUM_PROCESS``).

Each worker reads whole shards and packs a shard's tensors into one shared-memory byte buffer, which travels back as
a single file descriptor (torch.multiprocessing); the parent turns it into views again. The bytes are copied, never
converted, so the weights are bit-identical to the serial ``ckpt.iter_tensors()``. Shards are yielded in file order,
as the serial path does, while ``num_processes`` shards are read ahead: at most ``num_processes + 1`` shards are in
host memory at once (plus parts of a fused weight waiting for a part from a later shard).

Workers use the spawn start method (fork is unsafe once torch threads or CUDA exist), so the user's entry script must
guard its top-level code with ``if __name__ == "__main__":``. Spawn re-imports this module in every worker: keep its
imports to torch and the checkpoint readers.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing  # registers the reducers that send tensors through shared memory

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.loader.checkpoint import Checkpoint, Select, ShardedCheckpoint

_ALIGN = 64  # byte alignment of each tensor in a packed buffer, so that .view(dtype) is legal for every dtype
_AUTO_MAX_PROCESSES = 4  # RTP-LLM clamps its automatic count to [1, 4]
_AUTO_MIN_BYTES = 1 << 30  # below 1 GB one process is fastest: spawning a worker costs seconds (importing torch)


@dataclass
class _PackedShard:
    """The tensors of one shard, packed back to back into one shared-memory buffer."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    offsets: list[int]  # byte offset of each tensor in ``buffer``
    buffer: torch.Tensor  # [total_bytes] uint8, in shared memory

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, dtype, shape, offset in zip(self.names, self.dtypes, self.shapes, self.offsets, strict=True):
            nbytes = math.prod(shape) * dtype.itemsize
            yield name, self.buffer[offset : offset + nbytes].view(dtype).view(shape)


def _read_shard(file: Path, format: str, names: list[str], parts: dict[str, tuple] | None = None) -> _PackedShard:
    """Worker: read ``names`` (``parts``: the slices to read of some, see Checkpoint.iter_tensors) from one shard
    with the serial reader and pack them (runs in a spawned process)."""
    shard = ShardedCheckpoint(file, format, dict.fromkeys(names, file))
    tensors = list(shard.iter_tensors((parts or {}).get))
    offsets, total = [], 0
    for _, tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    # Allocated in shared memory directly: tensor.share_memory_() would copy a private buffer into a shared one.
    buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    for (_, tensor), offset in zip(tensors, offsets, strict=True):
        nbytes = tensor.numel() * tensor.element_size()
        buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    shard.close()
    return _PackedShard(
        [name for name, _ in tensors],
        [tensor.dtype for _, tensor in tensors],
        [tuple(tensor.shape) for _, tensor in tensors],
        offsets,
        buffer,
    )


def _names_by_file(ckpt: ShardedCheckpoint) -> dict[Path, list[str]]:
    names: dict[Path, list[str]] = {file: [] for file in ckpt.files}
    for name, file in ckpt._weight_map.items():  # same grouping and order as ShardedCheckpoint.iter_tensors
        names[file].append(name)
    return names


def auto_num_processes(ckpt: Checkpoint) -> int:
    """``LOAD_CKPT_NUM_PROCESS=0``: min(4, number of shards, CPU count), but 1 for a single file or under 1 GB.

    RTP-LLM derives its count from free GPU memory because its workers load onto the GPU; ours read into host memory
    and the parent holds at most count + 1 shards, so the shard and CPU counts are what bound the useful parallelism.
    """
    if not isinstance(ckpt, ShardedCheckpoint) or len(ckpt.files) < 2:
        return 1
    if sum(file.stat().st_size for file in ckpt.files) < _AUTO_MIN_BYTES:
        return 1
    return max(1, min(_AUTO_MAX_PROCESSES, len(ckpt.files), os.cpu_count() or 1))


def iter_tensors_parallel(
    ckpt: Checkpoint, num_processes: int, select: Select | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every ``(name, tensor)`` of ``ckpt``, as ``ckpt.iter_tensors(select)`` does, reading shards in workers.

    GGUF, single-file checkpoints and ``num_processes <= 1`` use the serial reader. A worker's failure is raised
    here as a CheckpointError naming the shard; closing the iterator early stops the workers.
    """
    if not isinstance(ckpt, ShardedCheckpoint) or len(ckpt.files) < 2 or num_processes <= 1:
        yield from ckpt.iter_tensors(select)
        return
    names_by_file = _names_by_file(ckpt)
    todo = deque(names_by_file.items())
    context = torch.multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=min(num_processes, len(todo)), mp_context=context)
    in_flight: deque[tuple[Path, Future[_PackedShard]]] = deque()

    def submit_next() -> None:
        file, names = todo.popleft()
        parts = {name: part for name in names if select is not None and (part := select(name)) is not None}
        in_flight.append((file, executor.submit(_read_shard, file, ckpt.format, names, parts)))

    try:
        while todo and len(in_flight) < num_processes:
            submit_next()
        while in_flight:
            file, future = in_flight.popleft()
            packed = _result(file, future)
            if todo:
                submit_next()  # keep every worker busy while this shard is copied into the model
            yield from packed.tensors()
            del packed  # the buffer lives on only through views the consumer still holds
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _result(file: Path, future: Future[_PackedShard]) -> _PackedShard:
    try:
        return future.result()
    except CheckpointError:
        raise
    except BrokenProcessPool as exc:
        raise CheckpointError(
            f"{file}: a checkpoint loader process exited while reading it ({exc}); with LOAD_CKPT_NUM_PROCESS > 1 "
            'the entry script must guard its top-level code with `if __name__ == "__main__":` (spawn re-runs it), '
            "and each process needs memory for a whole shard"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{file}: reading failed in a loader process ({type(exc).__name__}: {exc})") from None
