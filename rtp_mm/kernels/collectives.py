"""The tensor-parallel group and its collectives, on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

A ``TPGroup`` holds two process groups over the same ranks:
  * ``compute``: the model's all-reduces (after row-parallel projections and the vocab-parallel embedding) and the
    all-gather of vocab-parallel logits, plus the heartbeat. Its timeout (``COMPUTE_TIMEOUT``) bounds how long a rank
    waits for a hung peer: a step never takes that long between two collectives.
  * ``control``: rank 0's broadcast of each step's work (a pickled frozen batch). Shard workers wait on it while the
    server is idle, for hours if need be, so its timeout is long; a rank that *dies* is seen at once either way
    (gloo and NCCL report the closed connection), and a hung rank 0 is caught by the compute timeout on the next
    collective.

The all-reduce (FT_DISABLE_CUSTOM_AR): on CUDA with every rank on one node, messages up to ``CUSTOM_AR_MAX_BYTES`` go
through torch's symmetric-memory one-shot all-reduce (each rank reads its peers' buffers directly: one round, the
latency win RTP-LLM's custom all-reduce is for); larger messages and other setups use NCCL. FT_DISABLE_CUSTOM_AR=1
disables it. On CPU the all-reduce is gloo's, always. The choice is logged once at start-up.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

COMPUTE_TIMEOUT = timedelta(seconds=20)  # a hung peer fails the group well within 30 s
CONTROL_TIMEOUT = timedelta(days=30)  # shard workers wait for work as long as the server lives
CUSTOM_AR_MAX_BYTES = 48 * 2**20  # RTP-LLM's CUSTOM_AR_SIZE_THRESHOLD: larger messages use NCCL


class GroupFailed(RuntimeError):
    """A collective failed: a rank died or hung. The group cannot continue; the process must stop."""


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group. Invariant: every rank calls the same collectives in the
    same order (rank 0 decides the order and broadcasts it, see llm/engine/tp.py)."""

    rank: int
    size: int
    device: torch.device
    compute: Any = None  # torch.distributed ProcessGroup
    control: Any = None
    custom_ar: bool = False  # symmetric-memory one-shot all-reduce for small messages (CUDA, one node)
    _symm: Any = field(default=None, repr=False)  # (buffer, group name) of the symmetric-memory all-reduce

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place when possible; returns the summed tensor."""
        if self.custom_ar and x.numel() * x.element_size() <= CUSTOM_AR_MAX_BYTES:
            return self._one_shot_all_reduce(x)
        x = x.contiguous()
        self._run(dist.all_reduce, x, group=self.compute)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank order along the last dimension."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._run(dist.all_gather, parts, x, group=self.compute)
        return torch.cat(parts, dim=-1)

    def all_gather_ints(self, value: int) -> list[int]:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        return [int(v) for v in self.all_gather_last(t).tolist()]

    def all_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._run(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.compute)
        return int(t.item())

    def heartbeat(self) -> None:
        """A one-element all-reduce: fails within COMPUTE_TIMEOUT when a peer is dead or hung."""
        self.all_reduce(torch.zeros(1, device=self.device))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0 sends ``obj`` (pickled) to every rank; every rank returns it."""
        box = [obj if self.rank == 0 else None]
        self._run(dist.broadcast_object_list, box, src=0, group=self.control, device=self._object_device())
        return box[0]

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise GroupFailed(
                f"tensor-parallel rank {self.rank} of {self.size}: a collective failed, so another rank died or hung "
                f"({str(exc).splitlines()[0][:300]})"
            ) from None

    def _one_shot_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        buffer, name = self._symm
        flat = buffer.view(x.dtype)[: x.numel()]
        flat.copy_(x.reshape(-1))
        out = torch.ops.symm_mem.one_shot_all_reduce(flat, "sum", name)
        return out.view(x.shape)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


START_TIMEOUT = timedelta(minutes=10)  # joining the group: ranks may start minutes apart (image pulls, imports)


def init_group(
    rank: int, size: int, device: torch.device, disable_custom_ar: bool, single_node: bool, store: Any = None
) -> TPGroup:
    """Join the group (through ``store``, else torchrun's ``env://``) and choose the all-reduce."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=START_TIMEOUT, **init)
    group = TPGroup(rank, size, device)
    group.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    group.compute = dist.new_group(backend=backend, timeout=COMPUTE_TIMEOUT)
    group.custom_ar, reason = _choose_all_reduce(group, disable_custom_ar, single_node)
    if rank == 0:
        # WARNING: the one line saying how the group runs shows under the default LOG_LEVEL.
        logger.warning("tensor parallel: %d ranks over %s; all-reduce: %s", size, backend, reason)
    return group


def _choose_all_reduce(group: TPGroup, disabled: bool, single_node: bool) -> tuple[bool, str]:
    if group.device.type != "cuda":
        setting = "FT_DISABLE_CUSTOM_AR=1" if disabled else "custom all-reduce on"
        return False, f"gloo ({setting}, but CPU ranks have no custom all-reduce)"
    if disabled:
        return False, "NCCL (FT_DISABLE_CUSTOM_AR=1)"
    if not single_node:
        return False, "NCCL (the ranks span several machines)"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        name = group.compute.group_name
        buffer = symm_mem.empty(CUSTOM_AR_MAX_BYTES, dtype=torch.uint8, device=group.device)
        symm_mem.rendezvous(buffer, name)
        group._symm = (buffer, name)
    except Exception as exc:  # no P2P access between the GPUs, an old driver, a build without symmetric memory
        return False, f"NCCL (symmetric memory unavailable: {type(exc).__name__}: {str(exc)[:200]})"
    return True, f"one-shot symmetric-memory all-reduce up to {CUSTOM_AR_MAX_BYTES >> 20} MiB, NCCL above"
