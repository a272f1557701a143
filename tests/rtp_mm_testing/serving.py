"""Test helpers for the HTTP server: the Settings an app is built with, and a real server on a loopback port."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from rtp_mm import LLM
from rtp_mm.config import ServerConfig, Settings
from rtp_mm.server.app import BackgroundServer, create_app


def server_settings(llm: LLM, **server: Any) -> Settings:
    """``llm``'s own model and engine configuration with the given ServerConfig fields."""
    return Settings(model=llm.model_config, engine=llm.engine_config, server=ServerConfig(**server))


def app_for(llm: LLM, owns_llm: bool = False, **server: Any) -> web.Application:
    """The real app serving ``llm``'s engine (the server uses its EngineClient only)."""
    return create_app(llm.client, server_settings(llm, **server), owns_engine=owns_llm)


def background_server(llm: LLM, owns_llm: bool = False, **server: Any) -> BackgroundServer:
    """The real app for ``llm`` on a loopback port (``with background_server(llm) as url: ...``)."""
    return BackgroundServer(app_for(llm, owns_llm, **server))


def openai_client(url: str, api_key: str = "unused") -> Any:
    """The official ``openai`` client for a server at ``url`` (no retries: a test sees the first answer)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def start_server_process(ckpt: Any, **env: str) -> tuple[Any, str]:
    """``python -m rtp_mm.start_server`` on a free loopback port for the llama checkpoint ``ckpt`` (``env`` adds or
    overrides variables; stderr is piped), once ``/health`` answers: (the process, its base URL)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {
        **os.environ,
        "CHECKPOINT_PATH": str(ckpt),
        "MODEL_TYPE": "llama",
        "START_PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "INFO",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtp_mm.start_server"], env=full_env, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the server did not come up: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.2)
