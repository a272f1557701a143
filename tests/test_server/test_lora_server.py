"""LoRA through the HTTP server: a tiny random Llama with a tiny BPE tokenizer and three random peft adapters loaded
from LORA_INFO. The oracle is each adapter's peft-wrapped HF model, its greedy ids decoded by the tokenizer.

Native ``adapter_name`` (one name, or a list aligned with prompt_batch), OpenAI ``model`` naming an adapter and
``/v1/models`` listing them, ``POST /update`` (RTP-LLM's body; 601 on failure) while a stream runs, and the 4xx of an
unknown adapter.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests

from rtp_mm import LLM, ModelConfig
from rtp_mm_testing.lora import LLAMA_ADAPTERS, NEW_TOKENS, make_adapters
from rtp_mm_testing.oracle import hf_greedy, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, openai_client

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Adapters change what a model answers.",
    "rtp-mm serves language models over HTTP.",
    "Low-rank updates are small and cheap.",
]
PROMPTS = ["The quick brown", "Adapters change", "serves language", "Low-rank updates"]
GREEDY = {"top_k": 1, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    base = tiny_llama(root / "base", seed=0)
    tokenizer = tiny_bpe_tokenizer(root / "base", SENTENCES)
    paths, oracles = make_adapters(base, root, LLAMA_ADAPTERS)
    config = ModelConfig(
        model_type="llama", ckpt_path=str(root / "base"), weight_type="FP32", max_seq_len=256, lora_infos=paths
    )
    llm = LLM(config, kv_cache_mem_mb=16, max_lora_model_size=4)
    server = background_server(llm, owns_llm=True)
    url = server.start()
    yield url, llm, tokenizer, base, paths, oracles
    server.stop()


def expected_text(llm, tokenizer, model, prompt: str, new_tokens: int = NEW_TOKENS) -> str:
    ids = hf_greedy(model, llm.encode(prompt), new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_native_prompt_batch_with_adapter_list_matches_peft(setup):
    url, llm, tokenizer, base, paths, oracles = setup
    adapters = [None, "qv", "all", "mixed"]  # the base model and the three adapters in one request, one batch
    body = {"prompt_batch": PROMPTS, "adapter_name": adapters, **GREEDY}
    resp = requests.post(url + "/", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    texts = [item["response"] for item in resp.json()["response_batch"]]
    for prompt, name, text in zip(PROMPTS, adapters, texts, strict=True):
        assert text == expected_text(llm, tokenizer, oracles[name] if name else base, prompt), name
    # One name applies to every prompt.
    resp = requests.post(url + "/", json={"prompt_batch": PROMPTS[:2], "adapter_name": "all", **GREEDY}, timeout=60)
    texts = [item["response"] for item in resp.json()["response_batch"]]
    assert texts == [expected_text(llm, tokenizer, oracles["all"], p) for p in PROMPTS[:2]]


def test_native_errors(setup):
    url, *_ = setup
    cases = [
        ({"prompt_batch": PROMPTS, "adapter_name": ["qv", "all"]}, 507, "adapter_name is not alignment"),
        ({"prompt": PROMPTS[0], "adapter_name": "nope"}, 507, "'nope'"),
        ({"prompt": PROMPTS[0], "generate_config": {"adapter_name": 3}}, 516, "adapter_name"),
    ]
    for body, code, words in cases:
        resp = requests.post(url + "/", json={**body, **GREEDY}, timeout=60)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error_code"] == code and words in resp.json()["message"], resp.json()


def test_openai_model_names_an_adapter(setup):
    url, llm, tokenizer, base, paths, oracles = setup
    client = openai_client(url)
    ids = [model.id for model in client.models.list().data]
    assert ids[1:] == ["qv", "all", "mixed"] and ids[0] not in paths
    for model, oracle in (("mixed", oracles["mixed"]), ("some-other-name", base)):
        out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0)
        assert out.model == model
        assert out.choices[0].text == expected_text(llm, tokenizer, oracle, PROMPTS[1]), model
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "extra_configs": {"adapter_name": "nope"}}
    resp = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400 and "'nope'" in resp.json()["error"]["message"]


def _stream_text(url: str, body: dict, events: list, first: threading.Event) -> None:
    buffer = b""
    with requests.post(url + "/", json=body, stream=True, timeout=120) as resp:
        for data in resp.iter_content(chunk_size=None):
            buffer += data
            *chunks, buffer = buffer.split(b"\r\n\r\n")
            for chunk in chunks:
                if chunk != b"data:[done]":
                    events.append(json.loads(chunk[len(b"data:") :]))
                    first.set()


def test_update_adds_and_removes_while_a_stream_runs(setup):
    url, llm, tokenizer, base, paths, oracles = setup
    events: list[dict] = []
    first = threading.Event()
    body = {"prompt": PROMPTS[2], "adapter_name": "qv", "yield_generator": True, "top_k": 1, "ignore_eos": True}
    body["max_new_tokens"] = 200
    reader = threading.Thread(target=_stream_text, args=(url, body, events, first))
    reader.start()
    try:
        assert first.wait(60)
        # "qv" goes, "renamed" comes (qv's folder under another name): one RTP-LLM update body.
        wanted = {"all": paths["all"], "mixed": paths["mixed"], "renamed": paths["qv"]}
        resp = requests.post(url + "/update", json={"peft_info": {"lora_info": wanted}}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"status": "ok", "lora_info": wanted}
        assert not events[-1]["finished"], "the update must land while the stream runs"
        gone = requests.post(url + "/", json={"prompt": PROMPTS[0], "adapter_name": "qv", **GREEDY}, timeout=60)
        assert gone.status_code == 400 and "'qv'" in gone.json()["message"]
        new = requests.post(url + "/", json={"prompt": PROMPTS[0], "adapter_name": "renamed", **GREEDY}, timeout=60)
        assert new.json()["response"] == expected_text(llm, tokenizer, oracles["qv"], PROMPTS[0])
        assert [m["id"] for m in requests.get(url + "/v1/models", timeout=10).json()["data"][1:]] == list(wanted)
    finally:
        reader.join(120)
    assert events[-1]["finished"]
    assert events[-1]["response"] == expected_text(llm, tokenizer, oracles["qv"], PROMPTS[2], 200)  # kept qv
    restore = requests.post(url + "/update", json={"peft_info": {"lora_info": paths}}, timeout=60)
    assert restore.json()["lora_info"] == paths


def test_update_failures_are_601_and_change_nothing(setup, tmp_path):
    url, llm, tokenizer, base, paths, oracles = setup
    five = {**paths, "d": paths["qv"], "e": paths["qv"]}
    cases = [
        ({"peft_info": {"lora_info": {**paths, "bad": str(tmp_path)}}}, "adapter_config.json"),
        ({"peft_info": {"lora_info": five}}, "MAX_LORA_MODEL_SIZE=4"),
        ({"peft_info": {"lora_info": {"x": 1}}}, "lora_info"),
        ([1, 2], "JSON object"),
    ]
    for body, words in cases:
        resp = requests.post(url + "/update", json=body, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error_code"] == 601 and words in resp.json()["message"], resp.json()
    assert llm.adapters() == paths
    same = requests.post(url + "/update", json={"peft_info": {"lora_info": paths}, "sampler_info": {}}, timeout=60)
    assert same.status_code == 200 and same.json()["lora_info"] == paths
