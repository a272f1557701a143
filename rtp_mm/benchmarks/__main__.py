"""``python -m rtp_mm.benchmarks`` = ``rtp-mm bench``."""

import sys

from rtp_mm.benchmarks.cli import main

sys.exit(main())
