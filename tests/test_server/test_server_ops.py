"""Operations of the real server on a free loopback port: Prometheus metrics, API_KEY auth, access logs, the
concurrency limit, cancellation on disconnect (KV blocks freed), graceful shutdown, and ``python -m
rtp_mm.start_server`` answering on START_PORT and exiting cleanly on SIGTERM.

Oracles: ``LLM.stats()`` for KV blocks, the responses' own ``aux_info`` for token counts, prometheus_client's parser.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtp_mm import LLM, ModelConfig
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, openai_client, start_server_process

GREEDY = {"top_k": 1, "ignore_eos": True}
LONG = 3000  # max_new_tokens of a request that runs for seconds


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama_ops")
    tiny_llama(path, seed=5, max_position_embeddings=4096)
    tiny_bpe_tokenizer(path, ["Hello world, the quick brown fox.", "Streaming responses arrive."])
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    llm = LLM(
        ModelConfig(model_type="llama", ckpt_path=ckpt, max_seq_len=4096), kv_cache_mem_mb=16, concurrency_limit=2
    )
    yield llm
    llm.shutdown()


def _call(url: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            raw = resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype else raw.decode()


def _metrics(url: str) -> dict[str, float]:
    status, text = _call(url, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _idle(url: str) -> bool:
    _, status = _call(url, "/worker_status")
    return status["available_kv_cache"] == status["total_kv_cache"] and status["available_concurrency"] == 2


def test_metrics(url, llm):
    before = _metrics(url)
    auxes = []
    for prompt, n in (("Hello world", 3), ("The quick brown fox", 5)):
        status, body = _call(url, "/", {"prompt": prompt, "max_new_tokens": n, **GREEDY})
        assert status == 200
        auxes.append(body["aux_info"])
    assert _call(url, "/", {"prompt": ""})[0] == 400
    after = _metrics(url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("rtp_mm_http_requests_total{route=/,status=200}") == 2
    assert grew("rtp_mm_http_requests_total{route=/,status=400}") == 1
    assert grew("rtp_mm_prompt_tokens_total") == sum(a["input_len"] for a in auxes)
    assert grew("rtp_mm_generation_tokens_total") == sum(a["output_len"] for a in auxes) == 8
    assert grew("rtp_mm_time_to_first_token_seconds_count") == 2
    assert grew("rtp_mm_time_per_output_token_seconds_count") == 2
    assert after["rtp_mm_time_per_output_token_seconds_sum"] > before.get("rtp_mm_time_per_output_token_seconds_sum", 0)
    stats = llm.stats()
    assert after["rtp_mm_kv_blocks_total"] == stats["num_blocks"]
    assert after["rtp_mm_kv_blocks_in_use"] == 0
    assert after["rtp_mm_requests_running"] == after["rtp_mm_requests_waiting"] == 0
    assert "rtp_mm_prefix_cache_hit_tokens_total" in after
    assert after["rtp_mm_http_requests_in_flight"] == 0


def _open_stream(url: str, prompt: str = "Hello") -> socket.socket:
    """A raw streaming request; returns the socket after the first event arrived."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "yield_generator": True, "max_new_tokens": LONG, **GREEDY}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    received = b""
    while b"data:{" not in received:
        received += sock.recv(4096)
    return sock


def test_disconnect_mid_stream_frees_kv_blocks(url, llm):
    steps_before = llm.stats()["step_count"]
    sock = _open_stream(url)
    assert _metrics(url)["rtp_mm_kv_blocks_in_use"] > 0  # the stream holds KV blocks
    sock.close()
    _wait_until(lambda: _idle(url) and _metrics(url)["rtp_mm_kv_blocks_in_use"] == 0)
    assert llm.stats()["step_count"] - steps_before < LONG // 2  # cancelled, not run to completion


def test_concurrency_limit_and_worker_status(url, llm):
    socks = [_open_stream(url, p) for p in ("Hello", "Hello world")]
    _, status = _call(url, "/worker_status")
    assert status["available_concurrency"] == 0
    assert 0 < status["available_kv_cache"] < status["total_kv_cache"]
    assert status["total_kv_cache"] == llm.stats()["num_blocks"] * llm.model_config.seq_size_per_block
    code, body = _call(url, "/", {"prompt": "Hello", "max_new_tokens": 1})
    assert (code, body) == (409, {"error_code": 513, "message": "Concurrency limit 2 reached"})
    code, body = _call(url, "/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 1})
    assert code == 409 and body["error"]["code"] == 513
    for sock in socks:
        sock.close()
    _wait_until(lambda: _idle(url))
    assert _call(url, "/", {"prompt": "Hello", "max_new_tokens": 2, **GREEDY})[0] == 200


def test_api_key(llm):
    with background_server(llm, api_key="s3cret") as url:
        body = {"prompt": "Hello", "max_new_tokens": 1}
        code, error = _call(url, "/", body)
        assert code == 401 and error["error_code"] == 401 and "API key" in error["message"]
        assert _call(url, "/", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _call(url, "/v1/models")[0] == 401
        assert _call(url, "/metrics")[0] == 401
        assert _call(url, "/health") == (200, "ok")  # probes stay open
        assert _call(url, "/", body, {"Authorization": "Bearer s3cret"})[0] == 200
        import openai

        client = openai_client(url, "s3cret")
        assert client.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, "nope").models.list()


def test_access_log_at_info(url, caplog):
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        assert _call(url, "/health")[0] == 200
        _wait_until(lambda: any("GET /health" in r.getMessage() for r in caplog.records))
    line = next(r.getMessage() for r in caplog.records if "GET /health" in r.getMessage())
    assert '"GET /health HTTP/1.1" 200' in line and line.startswith("127.0.0.1")


def test_graceful_shutdown_finishes_in_flight_requests(ckpt):
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=ckpt, max_seq_len=4096), kv_cache_mem_mb=16)
    server = background_server(llm, owns_llm=True)
    url = server.start()
    result = {}

    def request() -> None:
        result["answer"] = _call(url, "/", {"prompt": "Hello", "max_new_tokens": 300, **GREEDY})

    client = threading.Thread(target=request)
    client.start()
    _wait_until(lambda: llm.stats()["num_running"] == 1)
    server.stop()  # returns once in-flight requests finished and the engine was shut down
    client.join(60)
    status, body = result["answer"]
    assert status == 200 and body["aux_info"]["output_len"] == 300 and body["finished"] is True
    assert not llm.alive
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_start_server_module_serves_and_stops_on_sigterm(ckpt):
    proc, url = start_server_process(ckpt, MAX_SEQ_LEN="256", KV_CACHE_MEM_MB="8")
    try:
        status, body = _call(url, "/", {"prompt": "Hello world", "max_new_tokens": 4, **GREEDY})
        assert status == 200 and body["aux_info"]["output_len"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"rtp-mm serving llama on {url}" in stderr
    assert '"POST / HTTP/1.1" 200' in stderr  # access log at INFO
