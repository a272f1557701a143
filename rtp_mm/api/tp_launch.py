"""Starting a tensor-parallel group (``parallel_config.py`` says how it is configured).

Local launch (TP_SIZE=N, no WORLD_SIZE): rank 0, the process building the engine, hosts the rendezvous store and
spawns ranks 1..N-1 as ``python -m rtp_mm.api.tp_worker`` processes, handing them its resolved configuration in a
private file; it waits until each has reached the store (watching for one that exits first), then every rank joins
the process group. torchrun launch (WORLD_SIZE set): every rank joins through ``env://``; torchrun owns the
processes and stops them all when one fails.

Afterwards rank 0 owns its spawned workers: ``stop_group`` (shutdown, or a failed build) tells them to stop and
reaps them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from rtp_mm.config import EngineConfig, ModelConfig
from rtp_mm.errors import ConfigError, RtpMmError
from rtp_mm.kernels.collectives import START_TIMEOUT, TPGroup, init_group
from rtp_mm.llm.loader import open_checkpoint
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.sharding import check_tp
from rtp_mm.model_types import resolve_model_type

logger = logging.getLogger(__name__)

_UP_KEY = "rtp_mm/up/{}"
_WORKER_EXIT_S = 10.0  # a told-to-stop worker gets this long before it is killed


@dataclass
class _LocalRanks:
    store: Any
    processes: list[subprocess.Popen] = field(default_factory=list)
    config_file: str = ""


_LOCAL: dict[int, _LocalRanks] = {}  # id(TPGroup) -> the workers rank 0 spawned for it


def check_tensor_parallel(model_config: ModelConfig, engine_config: EngineConfig) -> None:
    """Refuse, before any process starts, what is not sharded: each names its setting."""
    size = engine_config.parallel.tp_size
    if model_config.lora_infos:
        raise ConfigError(f"LORA_INFO: LoRA adapters are not sharded under tensor parallelism (TP_SIZE={size})")
    if model_config.ptuning_path:
        raise ConfigError(f"PTUNING_PATH: P-tuning prefixes are not sharded under tensor parallelism (TP_SIZE={size})")
    sp = engine_config.speculative
    if sp is not None and sp.uses_draft_model:
        raise ConfigError(
            f"SP_TYPE=vanilla: the draft model is not sharded under tensor parallelism (TP_SIZE={size}); "
            "SP_TYPE=prompt_lookup works"
        )
    device = engine_config.device
    if device.startswith("cuda:"):
        raise ConfigError(
            f"DEVICE={device!r}: under tensor parallelism each rank uses cuda:LOCAL_RANK; set DEVICE=cuda"
        )
    # Fail before any process starts when the model does not divide (only config.json and tensor names are read).
    info = resolve_model_type(model_config.model_type)
    with open_checkpoint(model_config.ckpt_path) as ckpt:
        spec = FAMILIES[info.family].build(ckpt.config(), set(ckpt.keys()), info.name).spec
    check_tp(spec, size, info.name)


def rank_device(engine_config: EngineConfig) -> torch.device:
    """This rank's device. CPU ranks of one machine share its cores: each takes cores / local ranks intra-op threads
    (PyTorch's default, all cores per process, oversubscribes them), unless OMP_NUM_THREADS says otherwise, as
    torchrun sets it."""
    p = engine_config.parallel
    if engine_config.device.startswith("cuda"):
        return torch.device("cuda", p.local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        local = p.local_world_size or p.tp_size
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def start_group(model_config: ModelConfig, engine_config: EngineConfig) -> TPGroup:
    """Rank 0: start or join the group."""
    p = engine_config.parallel
    if p.rank != 0:
        raise ConfigError(f"RANK={p.rank}: only rank 0 builds the engine; other ranks run rtp_mm.api.tp_worker")
    if p.launched:
        return join_group(engine_config)
    store = dist.TCPStore(
        p.master_addr, p.master_port, p.tp_size, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False
    )
    port = store.port
    local = _LocalRanks(store)
    try:
        local.config_file = _write_config(model_config, engine_config)
        for rank in range(1, p.tp_size):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(p.tp_size),
                "LOCAL_WORLD_SIZE": str(p.tp_size),
                "MASTER_ADDR": p.master_addr,
                "MASTER_PORT": str(port),
            }
            command = [sys.executable, "-m", "rtp_mm.api.tp_worker", local.config_file]
            local.processes.append(subprocess.Popen(command, env=env))
        _wait_for_workers(local, p.tp_size)
        group = init_group(0, p.tp_size, rank_device(engine_config), engine_config.ft_disable_custom_ar, True, store)
    except BaseException:
        _reap(local, tell=False)
        raise
    _LOCAL[id(group)] = local
    return group


def join_group(engine_config: EngineConfig, store: Any = None) -> TPGroup:
    """Any rank: join the group (``store``: a local launch's, reached by a spawned worker; None: torchrun's env://)."""
    p = engine_config.parallel
    if store is not None:
        store.set(_UP_KEY.format(p.rank), "1")
    device = rank_device(engine_config)
    return init_group(p.rank, p.tp_size, device, engine_config.ft_disable_custom_ar, p.single_node, store)


def worker_store(engine_config: EngineConfig) -> Any:
    p = engine_config.parallel
    return dist.TCPStore(p.master_addr, p.master_port, p.tp_size, is_master=False, timeout=START_TIMEOUT)


def stop_group(group: TPGroup) -> None:
    """Rank 0 at shutdown or after a failed build: its spawned workers stop (told, then killed), the group goes."""
    local = _LOCAL.pop(id(group), None)
    if local is not None:
        _reap(local, tell=True)
    try:
        group.destroy()
    except Exception:  # a group whose peers died may fail to tear down; the process is leaving it anyway
        logger.debug("process group teardown failed", exc_info=True)


def _write_config(model_config: ModelConfig, engine_config: EngineConfig) -> str:
    fd, path = tempfile.mkstemp(prefix="rtp_mm_tp_", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:  # mode 0600: only this user reads the configuration (API keys are not in it)
        pickle.dump((model_config, engine_config), f)
    return path


def _wait_for_workers(local: _LocalRanks, size: int) -> None:
    keys = [_UP_KEY.format(rank) for rank in range(1, size)]
    deadline = time.monotonic() + START_TIMEOUT.total_seconds()
    while not local.store.check(keys):
        for rank, proc in enumerate(local.processes, start=1):
            if proc.poll() is not None:
                raise RtpMmError(
                    f"tensor-parallel rank {rank} exited with status {proc.returncode} before joining the group "
                    "(its error is printed above)"
                )
        if time.monotonic() > deadline:
            raise RtpMmError(f"tensor-parallel ranks did not join within {START_TIMEOUT.total_seconds():.0f} s")
        time.sleep(0.05)


def _reap(local: _LocalRanks, tell: bool) -> None:
    deadline = time.monotonic() + (_WORKER_EXIT_S if tell else 0.0)
    for proc in local.processes:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if local.config_file:
        try:
            os.unlink(local.config_file)
        except FileNotFoundError:
            pass


def read_worker_config(path: str) -> tuple[ModelConfig, EngineConfig]:
    """A spawned worker's configuration: rank 0's, with this process's rank from the environment."""
    with open(path, "rb") as f:
        model_config, engine_config = pickle.load(f)
    p = engine_config.parallel
    rank = int(os.environ["RANK"])
    parallel = dataclasses.replace(
        p, rank=rank, local_rank=int(os.environ["LOCAL_RANK"]), master_port=int(os.environ["MASTER_PORT"])
    )
    return model_config, dataclasses.replace(engine_config, parallel=parallel)
