"""Tensor parallelism's configuration: TP_SIZE and the standard torch.distributed variables, read by ``config.py``
(the only reader of the environment) through ``parallel_from_env``.

Two ways to start ranks, one configuration:
  * one command on one machine: ``TP_SIZE=N`` and no ``WORLD_SIZE``: the process that builds the engine is rank 0 and
    spawns ranks 1..N-1 itself (``api/tp_launch.py``) on MASTER_ADDR (default 127.0.0.1) and MASTER_PORT (default: a
    free port);
  * ``torchrun`` (one machine or several): every process has ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT``; rank 0 serves, the others run their shard (``rtp_mm.start_server`` turns into
    a shard worker when RANK > 0). RTP-LLM's ``WORLD_RANK`` is accepted for ``RANK``.

The world is the tensor-parallel group (no pipeline or data parallelism), so TP_SIZE, when also set, must equal
WORLD_SIZE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rtp_mm.errors import ConfigError

PARALLEL_VARIABLES = (
    "TP_SIZE",
    "WORLD_SIZE",
    "RANK",
    "WORLD_RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class ParallelConfig:
    """Invariants: 1 <= tp_size; 0 <= rank < tp_size; ``launched`` (an outside launcher started every rank) has a
    master port; field names are the variables' in lower case, so errors name both."""

    tp_size: int = 1
    rank: int = 0
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: rank 0 of a local launch picks a free port
    launched: bool = False  # WORLD_SIZE was set: torchrun (or the like) started the ranks; rank 0 spawns nothing
    local_world_size: int = 0  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE); 0 = all of them

    def __post_init__(self) -> None:
        for name, minimum in (("tp_size", 1), ("rank", 0), ("local_rank", 0), ("master_port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name.upper()}={value!r} must be an integer >= {minimum}")
        if self.rank >= self.tp_size:
            raise ConfigError(f"RANK={self.rank} is outside the tensor-parallel group of TP_SIZE={self.tp_size}")
        if self.master_port > 65535:
            raise ConfigError(f"MASTER_PORT={self.master_port} is not a port; accepted: 1-65535")
        if self.launched and not self.master_port:
            raise ConfigError("WORLD_SIZE is set but MASTER_PORT is not: start the ranks with torchrun, or set both")

    @property
    def enabled(self) -> bool:
        return self.tp_size > 1

    @property
    def single_node(self) -> bool:
        return self.local_world_size in (0, self.tp_size)


def parallel_from_env(raw: Callable[[str], str | None], integer: Callable[..., int]) -> ParallelConfig:
    """The ParallelConfig of the environment (``raw``/``integer``: config.py's readers)."""
    world = raw("WORLD_SIZE")
    world_size = integer("WORLD_SIZE", 1, minimum=1)
    tp_size = integer("TP_SIZE", world_size, minimum=1)
    if world is not None and raw("TP_SIZE") is not None and tp_size != world_size:
        raise ConfigError(
            f"TP_SIZE={tp_size} and WORLD_SIZE={world_size} differ: every rank is a tensor-parallel rank "
            "(no pipeline or data parallelism), so set them equal or leave TP_SIZE unset"
        )
    rank_name = "RANK" if raw("RANK") is not None or raw("WORLD_RANK") is None else "WORLD_RANK"
    return ParallelConfig(
        tp_size=tp_size,
        rank=integer(rank_name, 0, minimum=0),
        local_rank=integer("LOCAL_RANK", 0, minimum=0),
        master_addr=raw("MASTER_ADDR") or "127.0.0.1",
        master_port=integer("MASTER_PORT", 0, minimum=0),
        launched=world is not None and world_size > 1,
        local_world_size=integer("LOCAL_WORLD_SIZE", 0, minimum=0),
    )
