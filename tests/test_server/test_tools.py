"""Function calling through the official ``openai`` client, on a tiny random Qwen 2 model with Qwen 2.5's real chat
template (fetched from the package registry, see ``rtp_mm_testing/chat_templates.py``).

Oracles: transformers' own rendering of the same template (prompt token counts), ``jsonschema`` for the arguments,
and OpenAI's documented shapes. A named ``tool_choice`` makes the result independent of the random model's quality:
the grammar engine constrains the answer to the function's parameter schema.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rtp_mm import LLM, ModelConfig
from rtp_mm.server.tools import parse_glm4, parse_hermes, parse_llama3_json
from rtp_mm_testing.chat_templates import QWEN2_5, chat_template
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama, tiny_qwen2
from rtp_mm_testing.serving import background_server, openai_client

SENTENCES = ["What is the weather in Paris today?", 'The weather tool returns {"city": "Paris", "unit": "c"}.']
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
USER = [{"role": "user", "content": "What is the weather in Paris today?"}]


def _qwen_tokenizer(path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template(QWEN2_5)
    fast.save_pretrained(str(path))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_tools")
    tiny_qwen2(path, seed=4, max_position_embeddings=2048)
    _qwen_tokenizer(path)
    llm = LLM(ModelConfig(model_type="qwen_2", ckpt_path=path, max_seq_len=2048), kv_cache_mem_mb=32)
    with background_server(llm) as url:
        yield llm, path, openai_client(url)
    llm.shutdown()


def _prompt_tokens(path, messages, tools) -> int:
    """transformers' rendering of the same template (the assistant's arguments as objects, as templates expect)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_named_tool_choice_round_trip(qwen):
    _, path, client = qwen
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="q", messages=USER, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=80, temperature=0
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The template showed the model its tools: the prompt is exactly transformers' rendering with them.
    assert reply.usage.prompt_tokens == _prompt_tokens(path, USER, [WEATHER, TIME])

    # The client sends the call and its result back; the template renders both.
    arguments = json.loads(call.function.arguments)
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    final = client.chat.completions.create(model="q", messages=history, tools=[WEATHER], max_tokens=4, temperature=0)
    assert final.choices[0].message.role == "assistant"
    rendered = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{**call.model_dump(), "function": {
            "name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]  # fmt: skip
    assert final.usage.prompt_tokens == _prompt_tokens(path, rendered, [WEATHER])


def test_named_tool_choice_streams_its_arguments(qwen):
    _, _, client = qwen
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="q", messages=USER, tools=[WEATHER], tool_choice=choice, max_tokens=80, temperature=0, stream=True
    )
    chunks = list(stream)
    header = chunks[0].choices[0].delta.tool_calls[0]
    assert header.function.name == "get_weather" and header.id and header.index == 0
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or "" for c in chunks[1:] if c.choices[0].delta.tool_calls
    )
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_calls_one_of_the_tools(qwen):
    _, _, client = qwen
    reply = client.chat.completions.create(
        model="q", messages=USER, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120, temperature=0
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    for c in calls:
        schema = (WEATHER if c.function.name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)


def test_auto_on_a_template_with_tools_answers(qwen):
    _, _, client = qwen
    reply = client.chat.completions.create(model="q", messages=USER, tools=[WEATHER], max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": None}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "tools"),
    ],
)
def test_bad_tool_requests(qwen, kwargs, param):
    _, _, client = qwen
    args = {"model": "q", "messages": USER, "tools": [WEATHER], "max_tokens": 2, **kwargs}
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.body["param"] == param


def test_auto_on_a_template_without_tools_is_400(tmp_path):
    tiny_llama(tmp_path, seed=1)
    tiny_bpe_tokenizer(tmp_path, SENTENCES, chat_template=TINY_CHAT_TEMPLATE)
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=tmp_path, max_seq_len=256), kv_cache_mem_mb=8)
    try:
        with background_server(llm) as url:
            client = openai_client(url)
            with pytest.raises(openai.BadRequestError, match="MODEL_TYPE=llama"):
                client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], max_tokens=2)
            # A named function still works: the grammar does not need the template.
            reply = client.chat.completions.create(
                model="m",
                messages=USER,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=80,
            )
            args = json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
            jsonschema.validate(args, WEATHER["function"]["parameters"])
    finally:
        llm.shutdown()


# ---- reading tool calls back (each family's format) ----------------------------------------------------------------
NAMES = {"get_weather", "get_time"}


def test_hermes_blocks_qwen2():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    )
    content, calls = parse_hermes(text, NAMES)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}
    two = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {}}'
    )
    assert [c.name for c in parse_hermes(two, NAMES)[1]] == ["get_time", "get_weather"]
    assert parse_hermes("no call here", NAMES) == ("no call here", [])
    assert parse_hermes('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', NAMES)[1] == []


def test_llama3_json():
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}', NAMES)
    assert content is None and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"tz": "UTC"}
    assert parse_llama3_json("The weather is fine.", NAMES)[1] == []
    assert parse_llama3_json('{"name": "nope", "parameters": {}}', NAMES)[1] == []


def test_glm4_name_then_arguments():
    content, calls = parse_glm4('get_weather\n{"city": "Paris", "unit": "c"}', NAMES)
    assert content is None and calls[0].name == "get_weather"
    assert parse_glm4("Hello\nthere", NAMES)[1] == []
