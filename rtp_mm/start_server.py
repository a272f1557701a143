"""``python -m rtp_mm.start_server``: configured by environment variables, like RTP-LLM's start_server.

Configuration errors stop start-up within seconds with one line naming the variable (exit code 2).
"""

from __future__ import annotations

import logging
import sys

from rtp_mm.config import Settings, configure_logging
from rtp_mm.errors import RtpMmError

logger = logging.getLogger("rtp_mm.start_server")


def main() -> int:
    try:
        settings = Settings.from_env()
        configure_logging(settings.server.log_level)
        from rtp_mm.server.app import run_server

        run_server(settings)
    except RtpMmError as e:
        print(f"rtp-mm: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
