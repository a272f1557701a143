"""A tensor-parallel shard worker: ``python -m rtp_mm.api.tp_worker CONFIG`` (spawned by rank 0, see tp_launch.py), or
``rtp_mm.start_server`` under torchrun with RANK > 0 (``run_worker``).

It joins the group, builds its shard exactly as rank 0 does (``builder.build_model``), then runs what rank 0
announces until told to stop. Exit status: 0 when stopped, 1 when the group failed (another rank died), 2 on a
configuration or checkpoint error.
"""

from __future__ import annotations

import logging
import sys

from rtp_mm.api.builder import build_model
from rtp_mm.api.tp_launch import join_group, read_worker_config, worker_store
from rtp_mm.config import EngineConfig, ModelConfig, configure_logging
from rtp_mm.errors import RtpMmError
from rtp_mm.kernels.collectives import GroupFailed
from rtp_mm.llm.engine.tp import serve_shard

logger = logging.getLogger("rtp_mm.api.tp_worker")


def run_worker(model_config: ModelConfig, engine_config: EngineConfig, store: object = None) -> int:
    rank = engine_config.parallel.rank
    group = None
    try:
        group = join_group(engine_config, store)
        parts = build_model(model_config, engine_config, group)
        serve_shard(parts.runner, group)
    except GroupFailed as e:
        print(f"rtp-mm: tensor-parallel rank {rank}: {e}", file=sys.stderr)
        return 1
    except RtpMmError as e:
        print(f"rtp-mm: tensor-parallel rank {rank}: error: {e.message}", file=sys.stderr)
        return 2
    finally:
        if group is not None:
            try:
                group.destroy()
            except Exception:
                logger.debug("process group teardown failed", exc_info=True)
    return 0


def main(argv: list[str]) -> int:
    model_config, engine_config = read_worker_config(argv[1])
    configure_logging("WARNING")
    return run_worker(model_config, engine_config, worker_store(engine_config))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
