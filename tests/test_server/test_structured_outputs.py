"""Structured outputs and logit_bias, through the official ``openai`` client and the native route.

The schema cases run on the built-in default model (SmolLM2-135M-Instruct), where the answers are real JSON from a
real model; the oracle is ``jsonschema`` (an independent validator), streamed and not. ``logit_bias`` is checked
against the offline API's own argmax on a tiny model: +100 forces a token, -100 bans the greedy one.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, openai_client

S = {"type": "string", "maxLength": 16}
OBJ = {"type": "object", "additionalProperties": False}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {**OBJ, "properties": props, "required": list(props) if required is None else required}


# 20 schemas of increasing depth: objects, arrays, enums, bounded numbers, nested required fields.
SCHEMAS = [
    _obj({"name": S}),
    _obj({"answer": {"type": "boolean"}}),
    _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"name": S, "age": {"type": "integer", "minimum": 1, "maximum": 99}}),
    _obj({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    _obj(
        {
            "ids": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 1,
                "maxItems": 4,
            }
        }
    ),
    _obj({"city": S, "country": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    _obj({"name": S, "nickname": S}, required=["name"]),
    _obj({"person": _obj({"first": S, "last": S})}),
    _obj(
        {
            "point": _obj(
                {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                }
            )
        }
    ),
    _obj(
        {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": _obj({"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 5}}),
            }
        }
    ),
    _obj({"status": {"enum": ["open", "closed"]}, "owner": _obj({"name": S, "admin": {"type": "boolean"}})}),
    _obj({"a": _obj({"b": _obj({"c": S})})}),
    _obj({"user": _obj({"name": S, "roles": {"type": "array", "items": {"enum": ["r", "w", "x"]}, "maxItems": 3}})}),
    _obj(
        {
            "order": _obj(
                {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "lines": {
                        "type": "array",
                        "maxItems": 2,
                        "items": _obj({"name": S, "price": {"type": "number", "minimum": 0, "maximum": 100}}),
                    },
                }
            )
        }
    ),
    _obj({"a": _obj({"b": _obj({"c": _obj({"d": {"type": "integer", "minimum": 0, "maximum": 9}})})})}),
    _obj(
        {
            "meta": _obj(
                {"version": {"type": "integer", "minimum": 1, "maximum": 9}, "author": _obj({"name": S, "email": S})}
            ),
            "body": S,
        }
    ),
    _obj(
        {
            "graph": _obj(
                {
                    "nodes": {
                        "type": "array",
                        "maxItems": 2,
                        "items": _obj(
                            {
                                "id": S,
                                "edges": {
                                    "type": "array",
                                    "maxItems": 2,
                                    "items": _obj({"to": S, "weight": {"type": "integer", "minimum": 0, "maximum": 9}}),
                                },
                            }
                        ),
                    }
                }
            )
        }
    ),
]


@pytest.fixture(scope="module")
def default_server(default_llm):
    with background_server(default_llm) as url:
        yield url


@pytest.fixture(scope="module")
def client(default_server):
    return openai_client(default_server)


def _messages(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON object that matches this schema: {json.dumps(schema)}"}]


def _format(i: int, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"case_{i}", "schema": schema, "strict": True}}


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_answers_validate(client, i):
    schema = SCHEMAS[i]
    args = {"model": "m", "messages": _messages(schema), "response_format": _format(i, schema), "max_tokens": 300}
    reply = client.chat.completions.create(**args, temperature=0)
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # Streaming, sampled: the deltas add up to a valid answer too.
    chunks = client.chat.completions.create(**args, temperature=0.7, seed=i, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_and_n_samples(client):
    reply = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        n=3,
        seed=1,
        max_tokens=200,
    )
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # an object may be cut by max_tokens; a finished one must parse
            assert isinstance(json.loads(choice.message.content), dict)
    assert any(c.finish_reason == "stop" for c in reply.choices)


def test_native_regex_and_json_schema(default_server):
    body = {"prompt": "My phone number is ", "regex": r"\(\d{3}\) \d{3}-\d{4}", "top_k": 1, "max_new_tokens": 40}
    data = requests.post(default_server + "/", json=body, timeout=120).json()
    assert data["finished"] and __import__("re").fullmatch(r"\(\d{3}\) \d{3}-\d{4}", data["response"]), data
    body = {"prompt": "A person:", "generate_config": {"json_schema": SCHEMAS[5], "top_k": 1, "max_new_tokens": 60}}
    data = requests.post(default_server + "/", json=body, timeout=120).json()
    jsonschema.validate(json.loads(data["response"]), SCHEMAS[5])
    bad = requests.post(default_server + "/", json={"prompt": "x", "regex": "(", "max_new_tokens": 2}, timeout=60)
    assert bad.status_code == 400 and "regex" in bad.json()["message"]
    both = requests.post(default_server + "/", json={"prompt": "x", "regex": "a", "grammar": "start: a"}, timeout=60)
    assert both.status_code == 400 and both.json()["error_code"] == 516


# ---- logit_bias ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bias_llama")
    tiny_llama(path, seed=11)
    tiny_bpe_tokenizer(path, ["The quick brown fox jumps over the lazy dog."], chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=128), kv_cache_mem_mb=8)
    with background_server(llm) as url:
        yield llm, openai_client(url)
    llm.shutdown()


def test_logit_bias_forces_and_bans(tiny):
    llm, client = tiny
    prompt = "The quick brown"
    greedy = llm.generate(prompt, GenerateConfig(max_new_tokens=1, top_k=1, logprobs=2, ignore_eos=True))[0]
    first, second = sorted(greedy.logprobs[0], key=lambda t: -greedy.logprobs[0][t])[:2]
    forced = client.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=0, logit_bias={"7": 100})
    banned = client.completions.create(
        model="m", prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(first): -100}, logprobs=0
    )
    assert llm.encode(forced.choices[0].text, add_special_tokens=False) == [7, 7, 7]
    assert llm.encode(banned.choices[0].text, add_special_tokens=False) == [second]


@pytest.mark.parametrize(
    "bias",
    [{"5": 101}, {"x": 1}, {str(i): 1 for i in range(301)}, {"100000": 1}],
    ids=["range", "key", "count", "vocab"],
)
def test_bad_logit_bias_is_400(tiny, bias):
    _, client = tiny
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="The quick", max_tokens=1, logit_bias=bias)
    assert "logit_bias" in info.value.body["message"] or info.value.body["param"] == "logit_bias"
