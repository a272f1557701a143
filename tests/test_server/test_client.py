"""The Python client (``Client`` and ``AsyncClient``) against the real server on a free loopback port.

Oracles: the offline API on the same engine for texts, ``LLM.stats()`` for cancellation, and the server's documented
error codes for the typed exceptions. Images go through multipart upload; the tiny model is text-only, so a valid
image answers the "text-only" error (the error path until vision lands) and a non-image the decode error.
"""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConcurrencyLimitError,
    GenerationTimeoutError,
    ServerError,
    error_from_body,
)
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server

GREEDY = {"top_k": 1, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_client")
    tiny_llama(path, seed=6, max_position_embeddings=4096)
    tiny_bpe_tokenizer(path, ["Hello world, the quick brown fox.", "Describe it."], chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(
        ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=4096), kv_cache_mem_mb=16, concurrency_limit=2
    )
    yield llm
    llm.shutdown()


@pytest.fixture
def client(url):
    with Client(url) as client:
        yield client


def _offline(llm: LLM, prompt: str, **config) -> str:
    return llm.generate(prompt, GenerateConfig(**config))[0].text


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


def _idle(llm: LLM) -> bool:
    stats = llm.stats()
    return stats["free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0


def test_health_and_generate(client, llm):
    client.wait_until_ready(timeout=30)
    assert client.health() is True
    out = client.generate("Hello world", max_new_tokens=8, **GREEDY)
    assert out.finished is True and out.aux_info["output_len"] == 8
    assert out.text == _offline(llm, "Hello world", max_new_tokens=8, **GREEDY)
    batch = client.generate(["Hello", "The quick brown fox"], max_new_tokens=4, **GREEDY)
    assert [g.text for g in batch] == [
        _offline(llm, p, max_new_tokens=4, **GREEDY) for p in ("Hello", "The quick brown fox")
    ]
    assert client.worker_status()["available_concurrency"] == 2


def test_health_of_a_dead_address():
    with Client("http://127.0.0.1:9", timeout=5) as client:
        assert client.health() is False
        with pytest.raises(TimeoutError):
            client.wait_until_ready(timeout=0.5)


def test_stream(client, llm):
    events = list(client.stream("The quick brown fox", max_new_tokens=10, **GREEDY))
    assert len(events) == 10 and events[-1].finished and not any(e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == _offline(llm, "The quick brown fox", max_new_tokens=10, **GREEDY)


def test_leaving_a_stream_early_cancels_it(client, llm):
    steps_before = llm.stats()["step_count"]
    for _ in client.stream("Hello", max_new_tokens=3000, **GREEDY):
        break
    deadline = time.monotonic() + 20
    while not _idle(llm):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert llm.stats()["step_count"] - steps_before < 1500


@pytest.mark.parametrize("kind", ["pil", "bytes", "path"])
def test_uploaded_image_reaches_the_server(client, tmp_path, kind):
    png = _png_bytes()
    path = tmp_path / "blue.png"
    path.write_bytes(png)
    image = {"pil": Image.open(io.BytesIO(png)), "bytes": png, "path": path}[kind]
    with pytest.raises(BadRequestError) as info:
        client.generate("Describe it.", images=[image], max_new_tokens=2)
    assert (info.value.status, info.value.error_code) == (400, 507) and "text-only" in info.value.message
    # Non-image bytes are decoded (and refused) by the server: the upload really arrived.
    with pytest.raises(BadRequestError) as info:
        client.generate("Describe it.", images=[b"not an image at all"], max_new_tokens=2)
    assert info.value.status == 422 and "not a decodable image" in info.value.message


def test_chat(client, llm):
    messages = [{"role": "user", "content": "Hello world"}]
    reply = client.chat(messages, max_tokens=6, temperature=0)
    expected = llm.chat(messages, GenerateConfig(max_new_tokens=6, top_k=1))[0]
    assert reply.text == expected.text and reply.finish_reason == expected.finish_reason
    assert reply.usage["completion_tokens"] == len(expected.token_ids)
    with pytest.raises(BadRequestError) as info:
        client.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Describe it."}, {"type": "image", "image": _png_bytes()}],
                }
            ],
            max_tokens=2,
        )
    assert info.value.error_code == 507 and "text-only" in info.value.message


def test_typed_errors(client):
    with pytest.raises(BadRequestError) as info:
        client.generate("quick brown fox " * 2000, max_new_tokens=2)
    assert info.value.error_code == 511
    with pytest.raises(BadRequestError) as info:
        client.generate("Hello", top_p=3.0)
    assert info.value.error_code == 516
    with pytest.raises(GenerationTimeoutError) as info:
        client.generate("Hello", max_new_tokens=3000, timeout_ms=50, **GREEDY)
    assert info.value.status == 504
    with pytest.raises(GenerationTimeoutError):  # the error arrives inside the stream
        list(client.stream("Hello", max_new_tokens=3000, timeout_ms=50, **GREEDY))
    with pytest.raises(BadRequestError) as info:
        client.embed("Hello")
    assert "not an embedding model" in info.value.message


def test_concurrency_limit_error(url, llm):
    with Client(url) as a, Client(url) as b, Client(url) as c:
        streams = [a.stream("Hello", max_new_tokens=3000, **GREEDY), b.stream("Hello", max_new_tokens=3000, **GREEDY)]
        for s in streams:
            next(s)
        with pytest.raises(ConcurrencyLimitError) as info:
            c.generate("Hello", max_new_tokens=1)
        assert (info.value.status, info.value.error_code) == (409, 513)
        for s in streams:
            s.close()
    deadline = time.monotonic() + 20
    while not _idle(llm):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_api_key(llm):
    with background_server(llm, api_key="k") as url:
        with Client(url) as anonymous, pytest.raises(AuthenticationError) as info:
            anonymous.generate("Hello", max_new_tokens=1)
        assert info.value.status == 401
        with Client(url, api_key="k") as client:
            assert client.generate("Hello", max_new_tokens=1, **GREEDY).finished


async def test_async_client(url, llm):
    async with AsyncClient(url) as client:
        await client.wait_until_ready(timeout=30)
        out = await client.generate("Hello world", max_new_tokens=5, **GREEDY)
        assert out.text == _offline(llm, "Hello world", max_new_tokens=5, **GREEDY)
        parts = [e.text async for e in client.stream("Hello world", max_new_tokens=5, **GREEDY)]
        assert "".join(parts) == out.text
        with pytest.raises(BadRequestError) as info:
            await client.generate("", max_new_tokens=1)
        assert info.value.error_code == 510


def test_error_bodies_of_both_shapes():
    native = error_from_body(409, {"error_code": 513, "message": "busy"})
    assert isinstance(native, ConcurrencyLimitError) and native.error_code == 513
    openai_shape = error_from_body(400, {"error": {"message": "bad", "type": "invalid_request_error", "code": "507"}})
    assert isinstance(openai_shape, BadRequestError) and openai_shape.error_code == 507
    other = error_from_body(500, "<html>proxy error</html>")
    assert type(other) is ServerError and other.error_code is None
