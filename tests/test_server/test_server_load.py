"""The bounded load script (scripts/load_server.py), run small: no failures besides intended 409s, every KV block
free at the end, and its numbers add up (oracle: the request count it was given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_server.py"


def test_load_script_small_run():
    args = ["--requests", "24", "--concurrency", "6", "--max-new-tokens", "8", "--json"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == 0, result["failure_examples"]
    assert result["succeeded"] + result["intended_409"] == 24 and result["succeeded"] >= 20
    assert result["all_kv_blocks_free"] and result["kv_tokens_free_at_end"] == result["kv_tokens_total"] > 0
    assert 4 * result["succeeded"] <= result["generated_tokens"] <= 8 * result["succeeded"]
