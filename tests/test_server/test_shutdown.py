"""Graceful shutdown keeps its promise: SIGTERM lets in-flight streams run for ``SHUTDOWN_TIMEOUT_S``, then they end
with their error event (native and OpenAI shapes) and ``python -m rtp_mm.start_server`` exits within the timeout plus
a few seconds, with exit status 0 (a shutdown asked for by SIGTERM is a clean exit). A server given an engine it does
not own fails its own streams the same way and leaves the engine serving. (Requests that finish within the timeout
complete normally: ``test_server_ops``.)

The streams ask for far more tokens than the tiny model makes in the timeout (about 1000 tokens/s for two sequences
on 2 CPU cores, slower as they grow), so they are still running when it runs out.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, start_server_process

TIMEOUT_S = 5
EXIT_WITHIN_S = 8  # the acceptance bound: the timeout plus a few seconds
LONG = 16000  # tokens: minutes on the tiny model, so only the shutdown can end these streams
MESSAGE = f"server shutting down: SHUTDOWN_TIMEOUT_S={TIMEOUT_S} ran out"
GREEDY = {"top_k": 1, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama_shutdown")
    tiny_llama(path, seed=5, max_position_embeddings=LONG + 64)
    tiny_bpe_tokenizer(path, ["Hello world, the quick brown fox.", "Streaming responses arrive."])
    return path


class _Stream(threading.Thread):
    """Reads one SSE response, recording each event's ``data`` with the time it arrived."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[tuple[float, str]] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        data = json.dumps(self.body).encode()
        request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        self.events.append((time.monotonic(), line[len("data:") :].strip()))
                        self.first.set()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()


def _openai_body() -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": LONG, "stream": True, "extra_configs": GREEDY}


def test_sigterm_ends_long_streams_with_an_error_event_and_exits_within_the_timeout(ckpt):
    proc, url = start_server_process(
        ckpt, MAX_SEQ_LEN=str(LONG + 64), KV_CACHE_MEM_MB="64", SHUTDOWN_TIMEOUT_S=str(TIMEOUT_S)
    )
    try:
        native = _Stream(
            url + "/",
            {"prompt": "Hello", "yield_generator": True, "return_incremental": True, "max_new_tokens": LONG, **GREEDY},
        )
        openai = _Stream(url + "/v1/completions", _openai_body())
        for stream in (native, openai):
            stream.start()
        for stream in (native, openai):
            assert stream.first.wait(60) and stream.error is None, stream.error
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            exited = time.monotonic() - sigterm
        for stream in (native, openai):
            stream.join(10)
            assert not stream.is_alive() and stream.error is None, stream.error
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 0, stderr
    assert exited < EXIT_WITHIN_S, f"exited {exited:.1f} s after SIGTERM\n{stderr}"

    # Native: the last event is RTP-LLM's error body (503's EngineDead, code 514); no "[done]" after an error.
    at, last = native.events[-1]
    assert json.loads(last) == {"error_code": 514, "message": MESSAGE}
    assert len(native.events) > 2 and all("error_code" not in data for _, data in native.events[:-1])
    # The streams ran for the whole timeout before they were failed.
    assert at - sigterm >= TIMEOUT_S - 0.5

    # OpenAI: an error event, then [DONE].
    (at, error), (_, done) = openai.events[-2:]
    assert done == "[DONE]"
    assert json.loads(error) == {"error": {"message": MESSAGE, "type": "server_error", "param": None, "code": 514}}
    assert at - sigterm >= TIMEOUT_S - 0.5
    assert f"SHUTDOWN_TIMEOUT_S={TIMEOUT_S} ran out with 2 requests in flight" in stderr


def test_stop_fails_the_servers_streams_and_leaves_a_given_engine_serving(ckpt):
    with LLM(ModelConfig(model_type="llama", ckpt_path=ckpt, max_seq_len=LONG + 64), kv_cache_mem_mb=64) as llm:
        server = background_server(llm, shutdown_timeout_s=1)
        url = server.start()
        stream = _Stream(url + "/v1/completions", _openai_body())
        stream.start()
        assert stream.first.wait(60) and stream.error is None, stream.error
        start = time.monotonic()
        server.stop()
        stopped = time.monotonic() - start
        stream.join(10)
        assert not stream.is_alive() and stream.error is None, stream.error
        assert 1 <= stopped < 3
        error = json.loads(stream.events[-2][1])["error"]
        assert error["message"] == "server shutting down: SHUTDOWN_TIMEOUT_S=1 ran out" and error["code"] == 514
        assert stream.events[-1][1] == "[DONE]"
        # The request was cancelled in the engine (its KV blocks freed) and the engine, not the server's, goes on.
        stats = llm.stats()
        assert stats["num_running"] == stats["num_waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]
        out = llm.generate(["Hello"], GenerateConfig(max_new_tokens=3, **GREEDY))[0]
        assert out.finished and len(out.token_ids) == 3
