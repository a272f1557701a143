"""Start-up failures: a bad configuration stops ``python -m rtp_mm.start_server`` within seconds, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _start(env_overrides: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_TYPE", "WEIGHT_TYPE", "CHECKPOINT_PATH")}
    env.update(env_overrides)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rtp_mm.start_server"], env=env, capture_output=True, text=True, timeout=60
    )
    return proc, time.monotonic() - start


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"MODEL_TYPE": "nonsense"}, ["MODEL_TYPE='nonsense'", "chatglm4v", "qwen_vl", "llama", "wizardcoder"]),
        ({"WEIGHT_TYPE": "INT3"}, ["WEIGHT_TYPE='INT3'", "FP16", "INT8", "BF16", "FP32"]),
        ({"CHECKPOINT_PATH": "/nonexistent/model"}, ["CHECKPOINT_PATH='/nonexistent/model'"]),
        ({"CONCURRENCY_LIMIT": "lots"}, ["CONCURRENCY_LIMIT='lots'", "integer"]),
    ],
)
def test_bad_configuration_fails_fast_in_one_line(env, expected):
    proc, seconds = _start(env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0]
    assert seconds < 30  # "within seconds": no model is loaded before the configuration is validated


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "rtp_mm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "serve" in proc.stdout and "bench" in proc.stdout
