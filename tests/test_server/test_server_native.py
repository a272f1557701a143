"""The native HTTP API (``POST /`` and friends) over a tiny random Llama with a tiny byte-level BPE tokenizer.

Oracles: the offline API on the same engine (``llm.generate``) for texts, the tokenizer loaded by transformers for
``/tokenizer/encode``, ``llm.stats()`` for KV blocks, and the behaviour reference (section 1) for shapes and codes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rtp_mm import LLM, EngineConfig, GenerateConfig, ModelConfig, Settings
from rtp_mm.config import ServerConfig
from rtp_mm.errors import ConfigError, EngineDead
from rtp_mm.server.app import create_app, run_server
from rtp_mm_testing.oracle import tiny_llama
from rtp_mm_testing.serving import server_settings

MAX_SEQ_LEN = 256
SLOW_MAX_SEQ_LEN = 4096
LONG = 3000  # max_new_tokens of a request that runs for seconds (about 5 ms per step here)
AUX_FIELDS = {"cost_time", "iter_count", "prefix_len", "input_len", "reuse_len", "output_len"}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny tokenizer for tests.",
    "rtp-mm serves language models over HTTP.",
    "Streaming responses arrive as server-sent events.",
]
GREEDY = {"top_k": 1, "ignore_eos": True}


def _save_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # < the model's 320
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2: Llama's default bos/eos ids
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(path)
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(path, seed=0, max_position_embeddings=SLOW_MAX_SEQ_LEN)
    _save_tokenizer(path)
    return path


def _llm(ckpt: Path, max_seq_len: int, **engine) -> LLM:
    return LLM(ModelConfig(model_type="llama", ckpt_path=ckpt, max_seq_len=max_seq_len), kv_cache_mem_mb=16, **engine)


@pytest.fixture(scope="module")
def llm(ckpt):
    llm = _llm(ckpt, MAX_SEQ_LEN)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def slow_llm(ckpt):
    """Long sequences and CONCURRENCY_LIMIT=2: requests that stay in flight for seconds."""
    llm = _llm(ckpt, SLOW_MAX_SEQ_LEN, concurrency_limit=2)
    yield llm
    llm.shutdown()


@pytest.fixture
async def client(aiohttp_client, llm):
    return await aiohttp_client(create_app(llm.client, server_settings(llm)))


@pytest.fixture
async def slow_client(aiohttp_client, slow_llm):
    return await aiohttp_client(create_app(slow_llm.client, server_settings(slow_llm)))


async def _post(client, body: dict, status: int = 200) -> dict:
    resp = await client.post("/", json=body)
    data = await resp.json()
    assert resp.status == status, data
    return data


def _events(raw: bytes) -> list[bytes]:
    """Payloads of a native SSE body, checking the exact framing: ``data:`` (no space), CRLF CRLF."""
    assert raw.endswith(b"\r\n\r\n"), raw[-40:]
    chunks = raw.split(b"\r\n\r\n")[:-1]
    for chunk in chunks:
        assert chunk.startswith(b"data:") and not chunk.startswith(b"data: "), chunk[:40]
    return [chunk[len(b"data:") :] for chunk in chunks]


async def _offline(llm: LLM, prompts, **config) -> list[str]:
    outs = await asyncio.to_thread(llm.generate, prompts, GenerateConfig(**config))
    return [o.text for o in outs]


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _engine_idle(llm: LLM) -> bool:
    stats = await asyncio.to_thread(llm.stats)
    return stats["free_blocks"] == stats["num_blocks"] and stats["num_running"] == stats["num_waiting"] == 0


# ---- response shapes --------------------------------------------------------------------------------------------
async def test_single_prompt_shape(client, llm):
    data = await _post(client, {"prompt": "Hello world", "generate_config": {"max_new_tokens": 5, **GREEDY}})
    assert set(data) == {"response", "finished", "aux_info"}
    assert isinstance(data["response"], str) and data["finished"] is True
    assert AUX_FIELDS <= set(data["aux_info"])
    aux = data["aux_info"]
    assert aux["output_len"] == 5 and aux["iter_count"] == 5
    assert aux["input_len"] == len(llm.encode("Hello world"))
    assert aux["reuse_len"] == 0 and aux["prefix_len"] == 0 and aux["cost_time"] > 0


async def test_greedy_result_equals_offline_generate(client, llm):
    prompt = "The quick brown fox"
    data = await _post(client, {"prompt": prompt, "generate_config": {"max_new_tokens": 12, "top_k": 1}})
    assert [data["response"]] == await _offline(llm, prompt, max_new_tokens=12, top_k=1)


async def test_text_and_generation_config_aliases(client, llm):
    data = await _post(client, {"text": "Hello", "generation_config": {"max_new_tokens": 4, **GREEDY}})
    assert data["aux_info"]["output_len"] == 4
    assert [data["response"]] == await _offline(llm, "Hello", max_new_tokens=4, **GREEDY)
    # A list under 'prompt' answers its first element only, as RTP-LLM does.
    listed = await _post(client, {"prompt": ["Hello", "The lazy dog"], "max_new_tokens": 4, **GREEDY})
    assert listed["response"] == data["response"]


async def test_top_level_fields_override_generate_config(client):
    body = {"prompt": "Hello", "max_new_tokens": 3, "generate_config": {"max_new_tokens": 9, **GREEDY}}
    assert (await _post(client, body))["aux_info"]["output_len"] == 3
    # gen_length stands for max_new_tokens only when max_new_tokens is absent.
    assert (await _post(client, {"prompt": "Hello", "gen_length": 2, **GREEDY}))["aux_info"]["output_len"] == 2
    body = {"prompt": "Hello", "gen_length": 2, "generate_config": {"max_new_tokens": 6, **GREEDY}}
    assert (await _post(client, body))["aux_info"]["output_len"] == 6


async def test_prompt_batch_in_order(client, llm):
    prompts = ["Hello world", "The lazy dog", "Streaming responses"]
    data = await _post(client, {"prompt_batch": prompts, "generate_config": {"max_new_tokens": 6, "top_k": 1}})
    assert set(data) == {"response_batch"} and len(data["response_batch"]) == 3
    assert all(r["finished"] and AUX_FIELDS <= set(r["aux_info"]) for r in data["response_batch"])
    texts = [r["response"] for r in data["response_batch"]]
    assert texts == await _offline(llm, prompts, max_new_tokens=6, top_k=1)


async def test_num_return_sequences(client, llm):
    config = {"max_new_tokens": 5, "num_return_sequences": 3, "random_seed": 7, "top_k": 0, "top_p": 1.0}
    data = await _post(client, {"prompt": "Hello", "generate_config": config})
    assert data["finished"] is True
    assert len(data["response"]) == 3 and len(data["aux_info"]) == 3
    assert all(isinstance(t, str) for t in data["response"])
    # Sequence j is sampled with random_seed + j.
    expected = [(await _offline(llm, "Hello", max_new_tokens=5, random_seed=7 + j, top_p=1.0))[0] for j in range(3)]
    assert data["response"] == expected
    batch = await _post(client, {"prompt_batch": ["a", "b"], "generate_config": config})
    assert [len(r["response"]) for r in batch["response_batch"]] == [3, 3]


# ---- streaming --------------------------------------------------------------------------------------------------
async def test_stream_cumulative(client, llm):
    body = {"prompt": "Hello world", "yield_generator": True, "generate_config": {"max_new_tokens": 6, **GREEDY}}
    resp = await client.post("/", json=body)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    payloads = _events(await resp.read())
    assert payloads[-1] == b"[done]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 6  # one per generated token
    texts = [e["response"] for e in events]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert [e["finished"] for e in events] == [False] * 5 + [True]
    assert [e["aux_info"]["output_len"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [texts[-1]] == await _offline(llm, "Hello world", max_new_tokens=6, **GREEDY)


@pytest.mark.parametrize(
    "switches",
    [
        {"stream": True, "generate_config": {"return_incremental": True}},
        {"generate_config": {"yield_generator": True, "return_incremental": True}},
    ],
    ids=["stream+incremental", "nested-yield_generator"],
)
async def test_stream_incremental(client, llm, switches):
    body = {"prompt": "The quick brown fox", "max_new_tokens": 8, **GREEDY, **switches}
    raw = await (await client.post("/", json=body)).read()
    payloads = _events(raw)
    assert payloads[-1] == b"[done]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 8 and events[-1]["finished"] is True
    joined = "".join(e["response"] for e in events)
    assert [joined] == await _offline(llm, "The quick brown fox", max_new_tokens=8, **GREEDY)


async def test_stream_prompt_batch_and_sequences_incremental(client, llm):
    prompts = ["Hello world", "The lazy dog"]
    body = {"prompt_batch": prompts, "stream": True, "return_incremental": True, "max_new_tokens": 5, **GREEDY}
    payloads = _events(await (await client.post("/", json=body)).read())
    assert payloads[-1] == b"[done]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 10  # one per token of either prompt
    joined = ["".join(e["response_batch"][i]["response"] for e in events) for i in range(2)]
    assert joined == await _offline(llm, prompts, max_new_tokens=5, **GREEDY)
    assert [r["finished"] for r in events[-1]["response_batch"]] == [True, True]
    # n sampled sequences stream as lists; the last event has every cumulative text.
    config = {"max_new_tokens": 4, "num_return_sequences": 2, "random_seed": 3, "top_p": 1.0}
    payloads = _events(await (await client.post("/", json={"prompt": "Hello", "stream": True, **config})).read())
    last = json.loads(payloads[-2])
    assert last["finished"] is True and len(last["aux_info"]) == 2
    assert last["response"] == (await _post(client, {"prompt": "Hello", **config}))["response"]


async def test_stream_error_is_one_more_event(slow_client):
    # The request's own timeout_ms runs out mid-stream: an error event and no [done].
    body = {"prompt": "Hello", "yield_generator": True, "max_new_tokens": LONG, "timeout_ms": 100, **GREEDY}
    resp = await slow_client.post("/", json=body)
    assert resp.status == 200
    payloads = _events(await resp.read())
    assert payloads[-1] != b"[done]"
    error = json.loads(payloads[-1])
    assert set(error) == {"error_code", "message"} and error["error_code"] == 603
    assert all("response" in json.loads(p) for p in payloads[:-1])


async def test_non_stream_timeout_is_504(slow_client, slow_llm):
    body = {"prompt": "Hello", "max_new_tokens": LONG, "timeout_ms": 100, **GREEDY}
    assert (await _post(slow_client, body, status=504))["error_code"] == 603
    await _wait_until(lambda: _engine_idle(slow_llm))


# ---- other routes -----------------------------------------------------------------------------------------------
async def test_home_and_health(client):
    resp = await client.get("/")
    assert resp.status == 200 and await resp.json() == {"status": "home"}
    for path in ("/health", "/status"):
        for method in ("GET", "POST"):
            resp = await client.request(method, path)
            assert resp.status == 200 and await resp.json() == "ok"


async def test_worker_status(client, llm):
    await _post(client, {"prompt": "Hello", "max_new_tokens": 3, **GREEDY})
    stats = await asyncio.to_thread(llm.stats)
    data = await (await client.get("/worker_status")).json()
    block_size = llm.model_config.seq_size_per_block
    assert data["alive"] is True
    assert data["available_concurrency"] == llm.engine_config.concurrency_limit
    assert data["total_kv_cache"] == stats["num_blocks"] * block_size
    assert data["available_kv_cache"] == data["total_kv_cache"]  # idle: every block is free
    assert data["iterate_count"] == stats["step_count"] >= 3
    assert data["step_latency_ms"] > 0


async def test_tokenizer_encode(client, ckpt):
    reference = AutoTokenizer.from_pretrained(str(ckpt))
    prompt = "Hello world, the lazy fox"
    data = await (await client.post("/tokenizer/encode", json={"prompt": prompt})).json()
    assert data["error"] == ""
    assert data["token_ids"] == reference.encode(prompt) and len(data["token_ids"]) > 2
    assert data["tokens"] == [reference.decode([t]) for t in data["token_ids"]]
    assert "".join(data["tokens"]) == prompt
    resp = await client.post("/tokenizer/encode", json={"prompt": 5})
    assert resp.status == 400 and (await resp.json())["error_code"] == 507


# ---- malformed requests -----------------------------------------------------------------------------------------
LONG_PROMPT = "quick brown fox " * 200  # far more than MAX_SEQ_LEN tokens


def _png_base64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MALFORMED = {
    "invalid-json": (b'{"prompt": "Hello",', 400, 507),
    "body-not-object": (b'["Hello"]', 400, 507),
    "prompt-not-string": ({"prompt": 123}, 400, 507),
    "missing-prompt": ({"generate_config": {"max_new_tokens": 3}}, 400, 509),
    "empty-prompt": ({"prompt": ""}, 400, 510),
    "prompt-batch-not-list": ({"prompt_batch": "Hello"}, 400, 507),
    "empty-prompt-in-batch": ({"prompt_batch": ["Hello", ""]}, 400, 510),
    "negative-max-new-tokens": ({"prompt": "Hello", "generate_config": {"max_new_tokens": -1}}, 400, 516),
    "top-p-2": ({"prompt": "Hello", "top_p": 2}, 400, 516),
    "generate-config-not-object": ({"prompt": "Hello", "generate_config": [1]}, 400, 516),
    "stop-words-not-list": ({"prompt": "Hello", "stop_words_str": "x"}, 400, 516),
    "prompt-over-max-seq-len": ({"prompt": LONG_PROMPT}, 400, 511),
    "too-long-streamed": ({"prompt": LONG_PROMPT, "yield_generator": True}, 400, 511),
    "incremental-without-stream": ({"prompt": "Hello", "return_incremental": True}, 400, 507),
    "yield-generator-not-bool": ({"prompt": "Hello", "yield_generator": "yes"}, 400, 507),
    "images-on-text-model": ({"prompt": "Hello", "images": [_png_base64()]}, 400, 507),
    "image-path-while-disabled": ({"prompt": "Hello", "images": ["cat.png"]}, 400, 507),
    "images-not-aligned-with-batch": ({"prompt_batch": ["a", "b"], "images": [[_png_base64()]]}, 400, 507),
    "images-not-list": ({"prompt": "Hello", "images": "cat.png"}, 400, 507),
    "too-many-sequences": ({"prompt_batch": ["a"] * 600, "num_return_sequences": 2}, 400, 507),
    "unknown-generate-config-field": ({"prompt": "Hello", "generate_config": {"max_new_tokenz": 3}}, 400, 516),
    "unsupported-rtp-llm-field": ({"prompt": "Hello", "return_hidden_states": True}, 400, 516),
    "unsupported-nested-field": ({"prompt": "Hello", "generate_config": {"return_input_ids": True}}, 400, 516),
    "calculate-loss-not-0-1-2": ({"prompt": "Hello", "generate_config": {"calculate_loss": 3}}, 400, 507),
    "calculate-loss-top-level": ({"prompt": "Hello", "calculate_loss": -1}, 400, 507),
    "select-token-out-of-vocab": ({"prompt": "Hello", "return_logits": True, "select_tokens_id": [10**6]}, 400, 507),
    "select-token-negative": ({"prompt": "Hello", "output_logits": True, "select_tokens_id": [-1]}, 400, 507),
    "float-max-new-tokens": ({"prompt": "Hello", "max_new_tokens": 2.5}, 400, 516),
    "logprobs-native": ({"prompt": "Hello", "logprobs": 2}, 400, 516),  # computed only where a shape carries it
    "prompt-logprobs-native": ({"prompt": "Hello", "generate_config": {"prompt_logprobs": 1}}, 400, 516),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request(client, case):
    body, status, code = MALFORMED[case]
    if isinstance(body, bytes):
        resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    else:
        resp = await client.post("/", json=body)
    data = await resp.json()
    assert (resp.status, data.get("error_code")) == (status, code), data
    assert set(data) == {"error_code", "message"} and data["message"]
    if case == "images-on-text-model":
        assert "text-only" in data["message"]
    # The server keeps serving.
    ok = await _post(client, {"prompt": "Hello", "max_new_tokens": 1, **GREEDY})
    assert ok["finished"] is True


async def test_huge_max_new_tokens_is_capped_by_max_seq_len(client, llm):
    # As RTP-LLM: the effective limit is min(max_new_tokens, MAX_SEQ_LEN - prompt_len), not an error.
    data = await _post(client, {"prompt": "Hello", "max_new_tokens": 10**30, **GREEDY})
    assert data["aux_info"]["output_len"] == MAX_SEQ_LEN - len(llm.encode("Hello"))


async def test_ignored_rtp_llm_fields(client):
    body = {"prompt": "Hello", "request_id": "abc", "generate_config": {"chat_id": "c1", "max_new_tokens": 2, **GREEDY}}
    assert (await _post(client, body))["aux_info"]["output_len"] == 2


async def test_unknown_route_and_method_are_json_errors(client):
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error_code"] == 507
    resp = await client.put("/")
    assert resp.status == 405 and set(await resp.json()) == {"error_code", "message"}


# ---- concurrency and cancellation -------------------------------------------------------------------------------
async def _open_stream(client, prompt: str = "Hello"):
    body = {"prompt": prompt, "yield_generator": True, "max_new_tokens": LONG, **GREEDY}
    resp = await client.post("/", json=body)
    assert resp.status == 200
    first = await resp.content.readuntil(b"\r\n\r\n")
    assert first.startswith(b"data:{")
    return resp


async def _available_concurrency(client) -> int:
    return (await (await client.get("/worker_status")).json())["available_concurrency"]


async def test_concurrency_limit(slow_client, slow_llm):
    streams = [await _open_stream(slow_client, p) for p in ("Hello", "The lazy dog")]
    assert await _available_concurrency(slow_client) == 0
    data = await _post(slow_client, {"prompt": "Hello", "max_new_tokens": 1}, status=409)
    assert data == {"error_code": 513, "message": "Concurrency limit 2 reached"}
    for resp in streams:
        resp.close()  # the slots come back when the server notices the disconnects

    async def all_available() -> bool:
        return await _available_concurrency(slow_client) == 2

    await _wait_until(all_available)
    assert (await _post(slow_client, {"prompt": "Hello", "max_new_tokens": 2, **GREEDY}))["finished"] is True
    await _wait_until(lambda: _engine_idle(slow_llm))


async def test_disconnect_mid_stream_frees_kv_blocks(slow_client, slow_llm):
    steps_before = (await asyncio.to_thread(slow_llm.stats))["step_count"]
    resp = await _open_stream(slow_client)
    await resp.content.readuntil(b"\r\n\r\n")
    stats = await asyncio.to_thread(slow_llm.stats)
    assert stats["free_blocks"] < stats["num_blocks"]  # the request holds KV blocks now
    resp.close()
    await _wait_until(lambda: _engine_idle(slow_llm))
    steps = (await asyncio.to_thread(slow_llm.stats))["step_count"] - steps_before
    assert steps < LONG // 2  # cancelled, not run to completion


async def test_disconnect_of_non_stream_request_with_handler_cancellation(aiohttp_client, slow_llm):
    # run_server enables handler_cancellation, so a non-stream client going away cancels its request too.
    app = create_app(slow_llm.client, server_settings(slow_llm))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    steps_before = (await asyncio.to_thread(slow_llm.stats))["step_count"]
    task = asyncio.create_task(client.post("/", json={"prompt": "Hello", "max_new_tokens": LONG, **GREEDY}))

    async def running() -> bool:
        return (await asyncio.to_thread(slow_llm.stats))["num_running"] == 1

    await _wait_until(running)
    task.cancel()
    await _wait_until(lambda: _engine_idle(slow_llm))
    assert (await asyncio.to_thread(slow_llm.stats))["step_count"] - steps_before < LONG // 2
    assert await _available_concurrency(client) == 2


# ---- lifecycle --------------------------------------------------------------------------------------------------
async def test_owned_engine_is_shut_down_with_the_app(aiohttp_client, ckpt):
    llm = _llm(ckpt, MAX_SEQ_LEN)
    client = await aiohttp_client(create_app(llm.client, server_settings(llm), owns_engine=True))
    assert (await _post(client, {"prompt": "Hello", "max_new_tokens": 2, **GREEDY}))["finished"] is True
    await client.close()
    with pytest.raises(EngineDead):
        await _offline(llm, "Hello", max_new_tokens=1)


def test_run_server_reports_a_busy_port(ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(
            model=ModelConfig(model_type="llama", ckpt_path=ckpt, max_seq_len=MAX_SEQ_LEN),
            engine=EngineConfig(kv_cache_mem_mb=16),
            server=ServerConfig(start_port=port, host="127.0.0.1"),
        )
        with pytest.raises(ConfigError, match=f"START_PORT={port}"):
            run_server(settings)
