"""Fuzzing every route of the real server (a tiny llama with a real BPE tokenizer on a loopback port).

Two generators, both bounded so the module runs in about a minute:

* schemathesis: cases generated from the server's own ``/openapi.json`` (well-typed bodies at the edges of every
  declared range, multipart included);
* hypothesis: JSON that ignores the schema (known field names with values of any type, unknown names, any nesting),
  and raw bytes.

Oracle: HTTP semantics and the error formats the README documents, not the server's own code: no response is a 5xx,
no stream carries a server-fault event (514), every error body has its route's shape (RTP-LLM's ``{"error_code",
"message"}``, OpenAI's ``{"error": {...}}`` under ``/v1/``) and no heap address. Afterwards the server answers
``/health``, every concurrency slot and every KV block is free, and 300 requests at concurrency 32 all succeed with
RSS growth under 50 MB.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtp_mm import LLM, ModelConfig
from rtp_mm.server.openapi import openapi_document
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer for tests."]
SCHEMA_EXAMPLES = 150  # per POST operation (6), besides the GET operations
RAW_EXAMPLES = 200  # per POST route (6)
MIN_REQUESTS = 2000
HEAP_ADDRESS = re.compile(r"0x[0-9a-f]{6,}")
POSTS = ("/", "/tokenizer/encode", "/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings")
FIELDS = {
    "/": ["prompt", "text", "prompt_batch", "generate_config", "images", "yield_generator", "max_new_tokens", "top_k"],
    "/tokenizer/encode": ["prompt"],
    "/v1/chat/completions": ["messages", "max_tokens", "n", "stop", "stream", "logprobs", "top_logprobs", "seed"],
    "/chat/completions": ["messages", "max_tokens", "temperature", "extra_configs", "stream_options", "stream"],
    "/v1/completions": ["prompt", "max_tokens", "logprobs", "n", "best_of", "stream", "extra_configs", "echo"],
    "/v1/embeddings": ["input", "encoding_format", "is_query", "model"],
}


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: CI stays reproducible
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_llama")
    tiny_llama(path, seed=5)
    tiny_bpe_tokenizer(path, SENTENCES, chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=32), kv_cache_mem_mb=16)
    yield llm
    llm.shutdown()


class Tally:
    """Every response seen, checked as it arrives."""

    def __init__(self) -> None:
        self.count = 0
        self.statuses: dict[int, int] = {}

    def check(self, method: str, path: str, resp: requests.Response, sent: object) -> None:
        self.count += 1
        self.statuses[resp.status_code] = self.statuses.get(resp.status_code, 0) + 1
        where = f"{method} {path} {str(sent)[:300]!r} -> {resp.status_code} {resp.text[:300]!r}"
        assert resp.status_code < 500, where
        assert not HEAP_ADDRESS.search(resp.text), where
        if resp.status_code >= 400:
            body = resp.json()
            if path.startswith("/v1/"):
                assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, where
            else:
                assert set(body) == {"error_code", "message"} and body["message"], where
        elif resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            assert "514" not in resp.text, where  # a server fault inside a stream


@pytest.fixture(scope="module")
def tally():
    return Tally()


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


SCHEMA = schemathesis.openapi.from_dict(openapi_document())


@pytest.mark.timeout(600)
def test_schemathesis_cases_never_answer_5xx(url, session, tally):
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        examples = SCHEMA_EXAMPLES if operation.method.upper() == "POST" else 3

        @_settings(examples)
        @given(case=operation.as_strategy())
        def run(case):
            resp = case.call(base_url=url, session=session, timeout=60)
            tally.check(case.operation.method.upper(), case.operation.path, resp, case.body)

        run()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _bodies(path: str) -> st.SearchStrategy:
    known = st.fixed_dictionaries({}, optional={name: JSON for name in FIELDS[path]})
    return st.one_of(known, JSON, st.binary(max_size=64))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", POSTS)
def test_any_json_or_bytes_never_answers_5xx(url, session, tally, path):
    @_settings(RAW_EXAMPLES)
    @given(body=_bodies(path))
    def run(body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = session.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
        tally.check("POST", path, resp, body)

    run()


def _wait_idle(url: str, llm: LLM, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats, status = llm.stats(), requests.get(url + "/worker_status", timeout=10).json()
        limit = llm.engine_config.concurrency_limit
        if stats["free_blocks"] == stats["num_blocks"] and status["available_concurrency"] == limit:
            return
        assert time.monotonic() < deadline, (stats, status)
        time.sleep(0.05)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _one(url: str, i: int) -> int:
    kind = i % 3
    if kind == 0:
        body = {"prompt": f"Hello {i}", "max_new_tokens": 8, "top_k": 1, "yield_generator": i % 2 == 0}
        return requests.post(url + "/", json=body, timeout=120).status_code
    body = {"model": "m", "max_tokens": 8, "stream": i % 2 == 0, "seed": i}
    if kind == 1:
        body["messages"] = [{"role": "user", "content": f"Hello {i}"}]
        return requests.post(url + "/v1/chat/completions", json=body, timeout=120).status_code
    body["prompt"] = f"The quick {i}"
    return requests.post(url + "/v1/completions", json=body, timeout=120).status_code


def test_after_fuzzing_the_server_is_whole(url, llm, tally):
    """Runs after the fuzz tests (module order): their request count, then health, then 300 requests at 32."""
    assert tally.count >= MIN_REQUESTS, tally.statuses
    print(f"fuzz: {tally.count} requests, statuses {sorted(tally.statuses.items())}")
    assert requests.get(url + "/health", timeout=10).json() == "ok"
    _wait_idle(url, llm)
    rss_before = _rss_mb()
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda i: _one(url, i), range(300)))
    _wait_idle(url, llm)
    growth = _rss_mb() - rss_before
    print(f"300 requests at concurrency 32: statuses {sorted(set(statuses))}, RSS growth {growth:.1f} MB")
    assert statuses == [200] * 300
    assert growth < 50
