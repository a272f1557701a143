"""Start-up failures: a bad configuration stops ``python -m rtp_mm.start_server`` within seconds, in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rtp_mm import EngineConfig, ModelConfig, Settings
from rtp_mm.config import ServerConfig
from rtp_mm.errors import ConfigError
from rtp_mm.server import app as server_app


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


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def _settings(port: int) -> Settings:
    return Settings(model=ModelConfig(), engine=EngineConfig(), server=ServerConfig(start_port=port, host="127.0.0.1"))


def test_busy_port_is_reported_before_the_model_loads(busy_port, monkeypatch):
    loads = []
    monkeypatch.setattr(server_app, "EngineClient", lambda *args: loads.append(args))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"START_PORT={busy_port}: cannot listen on 127.0.0.1:{busy_port}"):
        server_app.run_server(_settings(busy_port))
    assert loads == [] and time.monotonic() - start < 2


def test_port_is_held_while_the_model_loads(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen = []

    def load(*args, **kwargs):
        with socket.socket() as rival:  # another process starting on the same port while this one loads
            try:
                rival.bind(("127.0.0.1", port))
                seen.append("free")
            except OSError:
                seen.append("taken")
            try:
                rival.connect(("127.0.0.1", port))
                seen.append("accepted")
            except OSError:
                seen.append("refused")  # bound but not listening yet: no client waits on a loading server
        raise RuntimeError("stop after the probe")

    monkeypatch.setattr(server_app, "EngineClient", load)
    with pytest.raises(RuntimeError, match="stop after the probe"):
        server_app.run_server(_settings(port))
    assert seen == ["taken", "refused"]


def test_busy_port_exit_code_and_line(busy_port, tmp_path):
    # A checkpoint whose load would fail: the port's error must come first.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    env = {"START_PORT": str(busy_port), "HOST": "127.0.0.1", "CHECKPOINT_PATH": str(tmp_path)}
    proc, _ = _start(env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"START_PORT={busy_port}: cannot listen on 127.0.0.1:{busy_port}" in lines[0], lines


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "rtp_mm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "serve" in proc.stdout and "bench" in proc.stdout
