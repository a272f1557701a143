"""CORS (``CORS_ALLOW_ORIGINS``) against the real server on a loopback port, over raw HTTP.

Oracle: the Fetch standard's CORS protocol as a browser applies it: a preflight (``OPTIONS`` with
``Access-Control-Request-Method``, never carrying ``Authorization``) must be answered 2xx with an
``Access-Control-Allow-Origin`` equal to the page's origin (or ``*``) and allow the method and headers the page sends;
the real response, streamed or an error, must carry ``Access-Control-Allow-Origin`` too or the page cannot read it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message

import pytest

from rtp_mm import LLM, ModelConfig, Settings
from rtp_mm.errors import ConfigError
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server

APP = "http://app.example"
KEY = "s3cret"
CHAT = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 3, "temperature": 0}
NATIVE = {"prompt": "Hello world", "max_new_tokens": 3, "top_k": 1}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_cors")
    tiny_llama(path, seed=3)
    tiny_bpe_tokenizer(path, ["Hello world, a tiny tokenizer."], chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=128), kv_cache_mem_mb=8)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(llm):
    with background_server(llm, api_key=KEY, cors_allow_origins=(APP,)) as url:
        yield url


def call(url: str, method: str = "GET", body: dict | None = None, **headers: str) -> tuple[int, Message, bytes]:
    """(status, headers, body) of one request; ``headers`` spelled with underscores for dashes."""
    data = json.dumps(body).encode() if body is not None else None
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if data is not None:
        sent["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def preflight(url: str, origin: str, request_headers: str = "authorization, content-type") -> tuple[int, Message]:
    status, headers, _ = call(
        url,
        "OPTIONS",
        Origin=origin,
        Access_Control_Request_Method="POST",
        Access_Control_Request_Headers=request_headers,
    )
    return status, headers


def listed(headers: Message, name: str) -> set[str]:
    return {v.strip().lower() for v in (headers.get(name) or "").split(",") if v.strip()}


def cors_headers(headers: Message) -> list[str]:
    return [k for k in headers if k.lower().startswith("access-control-")]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/"])
def test_preflight_from_an_allowed_origin_is_answered_without_the_key(url, path):
    status, headers = preflight(url + path, APP, "authorization, content-type, x-stainless-os, bad header")
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == APP
    assert {"get", "post", "options"} <= listed(headers, "Access-Control-Allow-Methods")
    allowed = listed(headers, "Access-Control-Allow-Headers")
    # Authorization must be named explicitly (a "*" would not cover it); a malformed name is not echoed.
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed and "bad header" not in allowed
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "origin" in listed(headers, "Vary")  # the answer depends on the origin: caches must keep them apart
    assert "Access-Control-Allow-Credentials" not in headers  # the key is an explicit header, not a credential


def test_real_request_needs_the_key_and_carries_allow_origin(url):
    status, headers, body = call(url + "/v1/chat/completions", "POST", CHAT, Origin=APP)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == APP  # the page can read why
    assert json.loads(body)["error"]["type"] == "authentication_error"
    status, headers, body = call(url + "/v1/chat/completions", "POST", CHAT, Origin=APP, Authorization=f"Bearer {KEY}")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert "origin" in listed(headers, "Vary")
    status, headers, _ = call(url + "/v1/nowhere", "POST", CHAT, Origin=APP, Authorization=f"Bearer {KEY}")
    assert status == 404 and headers["Access-Control-Allow-Origin"] == APP


@pytest.mark.parametrize(
    "path,body,done",
    [("/v1/chat/completions", {**CHAT, "stream": True}, b"data: [DONE]"), ("/", {**NATIVE, "stream": True}, b"[done]")],
)
def test_streamed_responses_carry_allow_origin(url, path, body, done):
    status, headers, raw = call(url + path, "POST", body, Origin=APP, Authorization=f"Bearer {KEY}")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["Access-Control-Allow-Origin"] == APP
    assert raw.rstrip().endswith(done)


def test_other_origins_get_no_cors_headers(url):
    status, headers = preflight(url + "/v1/chat/completions", "http://evil.example")
    assert status != 204 and cors_headers(headers) == []  # answered as any OPTIONS (here 401): the browser blocks
    status, headers, _ = call(url + "/v1/models", Origin="http://evil.example", Authorization=f"Bearer {KEY}")
    assert status == 200 and cors_headers(headers) == []
    assert "origin" in listed(headers, "Vary")
    # Same scheme and host on another port is another origin.
    status, headers = preflight(url + "/v1/chat/completions", APP + ":8080")
    assert status != 204 and cors_headers(headers) == []


def test_any_origin(llm):
    with background_server(llm, api_key=KEY, cors_allow_origins=("*",)) as url:
        status, headers = preflight(url + "/v1/chat/completions", "http://anything.example")
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
        assert "authorization" in listed(headers, "Access-Control-Allow-Headers")
        status, headers, _ = call(url + "/v1/models", Origin="http://anything.example", Authorization=f"Bearer {KEY}")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert "origin" not in listed(headers, "Vary")  # the same answer for every origin


def test_off_by_default(llm):
    with background_server(llm) as url:
        status, headers = preflight(url + "/v1/chat/completions", APP)
        assert status == 405 and cors_headers(headers) == []  # no preflight answer: the browser blocks
        status, headers, _ = call(url + "/v1/chat/completions", "POST", CHAT, Origin=APP)
        assert status == 200 and cors_headers(headers) == [] and "Vary" not in headers


# --- CORS_ALLOW_ORIGINS parsing (config.py) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,parsed",
    [
        ("", ()),  # off
        ("*", ("*",)),
        (" http://app.example ", ("http://app.example",)),
        # As browsers send Origin: lower case, no default port; duplicates collapse.
        (
            "HTTPS://App.Example:443,http://localhost:3000,https://app.example",
            ("https://app.example", "http://localhost:3000"),
        ),
        ("http://[::1]:8080,chrome-extension://abcdef", ("http://[::1]:8080", "chrome-extension://abcdef")),
    ],
)
def test_cors_allow_origins_parsed(value, parsed):
    assert Settings.from_env({"CORS_ALLOW_ORIGINS": value}).server.cors_allow_origins == parsed


@pytest.mark.parametrize(
    "value", ["app.example", "http://app.example/", "http://app.example/path", "http://u@app.example", "*,http://a.b"]
)
def test_cors_allow_origins_rejected_at_start_up(value):
    with pytest.raises(ConfigError, match=r"CORS_ALLOW_ORIGINS.*scheme://host\[:port\]"):
        Settings.from_env({"CORS_ALLOW_ORIGINS": value})
