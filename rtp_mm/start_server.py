"""``python -m rtp_mm.start_server``: configured by environment variables, like RTP-LLM's start_server.

Configuration errors stop start-up within seconds with one line naming the variable (exit code 2); an engine that
stops while serving (a tensor-parallel rank died) ends the process with exit code 1. Under torchrun, ranks above 0
run their model shard for rank 0's server (``api/tp_worker.py``).
"""

from __future__ import annotations

import logging
import sys

from rtp_mm.config import Settings, configure_logging
from rtp_mm.errors import EngineDead, RtpMmError

logger = logging.getLogger("rtp_mm.start_server")


def main() -> int:
    try:
        settings = Settings.from_env()
        configure_logging(settings.server.log_level)
        if settings.engine.parallel.rank > 0:  # torchrun: this rank runs its shard for rank 0's server
            from rtp_mm.api.builder import resolve_model_config
            from rtp_mm.api.tp_worker import run_worker

            return run_worker(resolve_model_config(settings.model), settings.engine)
        from rtp_mm.server.app import run_server

        run_server(settings)
    except EngineDead as e:  # the engine stopped while serving (a tensor-parallel rank died)
        print(f"rtp-mm: error: {e.message}", file=sys.stderr)
        return 1
    except RtpMmError as e:
        print(f"rtp-mm: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
