"""Prompt logprobs over HTTP: ``echo`` and ``max_tokens: 0`` on ``/v1/completions`` through the official ``openai``
client, and RTP-LLM's ``calculate_loss`` / ``return_logits`` on ``POST /``.

Oracles: HF transformers' log_softmax of the prompt on the same tiny checkpoint (the server runs it in float32), the
tokenizer, and OpenAI's documented shapes (the first echoed token's logprob and top_logprobs are null)."""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests
import torch

from rtp_mm import LLM, ModelConfig
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import openai_client

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer for tests."]
PROMPT = "The quick brown fox"
ATOL = 1e-4


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_echo")
    tiny_llama(path, seed=11)
    tiny_bpe_tokenizer(path, SENTENCES)
    return path


@pytest.fixture(scope="module")
def llm(path):
    # FP32 and small prefill chunks: the values are compared with float32 HF, and echo crosses chunk boundaries.
    config = ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=128, weight_type="FP32")
    llm = LLM(config, kv_cache_mem_mb=16, max_num_batched_tokens=6)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_echoed_prompt(logprobs, ids: list[int], ref: torch.Tensor, top: int, token_text) -> None:
    """The first len(ids) entries of an echo's logprobs against HF."""
    n = len(ids)
    assert logprobs.tokens[:n] == [token_text(t) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, n):
        assert abs(logprobs.token_logprobs[p] - float(ref[p - 1, ids[p]])) < ATOL, p
        # Keyed by token text, as OpenAI's format is: byte-level tokens that decode alike share one key.
        expected = torch.topk(ref[p - 1], top)
        by_text = {token_text(t): v for t, v in zip(expected.indices.tolist(), expected.values.tolist(), strict=True)}
        assert logprobs.top_logprobs[p] == pytest.approx(by_text, abs=ATOL), p
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets


def test_echo_of_token_ids_with_one_generated_token(client, llm, hf):
    """What lm-eval's loglikelihood sends: token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0."""
    prompts = [llm.encode(PROMPT), llm.encode("Hello world, this is a tiny")]
    resp = client.completions.create(
        model="m", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    assert [c.index for c in resp.choices] == [0, 1]
    for ids, choice in zip(prompts, resp.choices, strict=True):
        ref = hf_logprobs(hf, ids)
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
        check_echoed_prompt(lp, ids, ref, 1, llm.client.token_text)
        generated = int(ref[-1].argmax())  # greedy: the generated token is HF's argmax after the prompt
        assert lp.tokens[-1] == llm.client.token_text(generated)
        assert abs(lp.token_logprobs[-1] - float(ref[-1, generated])) < ATOL
        assert choice.text.startswith(llm.tokenizer.decode(ids))
        assert choice.finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == sum(len(p) for p in prompts) and resp.usage.completion_tokens == 2


def test_echo_keeps_the_eos_that_ended_the_answer(client, llm, hf):
    """lm-eval reads token_logprobs[ctxlen:-1]: the generated token must be there even when it is the EOS."""
    ids = llm.encode(PROMPT)
    eos = int(hf_logprobs(hf, ids)[-1].argmax())  # make the greedy next token the request's EOS
    kwargs = dict(model="m", prompt=ids, logprobs=1, max_tokens=1, temperature=0, extra_body={"extra_configs": {}})
    kwargs["extra_body"]["extra_configs"]["eos_token_id"] = eos
    echoed = client.completions.create(echo=True, **kwargs).choices[0]
    plain = client.completions.create(**kwargs).choices[0]
    assert echoed.finish_reason == plain.finish_reason == "stop"
    assert len(echoed.logprobs.tokens) == len(ids) + 1 and echoed.logprobs.tokens[-1] == llm.client.token_text(eos)
    assert plain.logprobs.tokens == []  # without echo an EOS has no text and no entry, as before


def test_echo_of_text_with_max_tokens_zero(client, llm, hf):
    resp = client.completions.create(model="m", prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    (choice,) = resp.choices
    ids = llm.encode(PROMPT)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    check_echoed_prompt(choice.logprobs, ids, hf_logprobs(hf, ids), 3, llm.client.token_text)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 0)


def test_max_tokens_zero_without_echo_generates_nothing(client):
    resp = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, logprobs=2)
    (choice,) = resp.choices
    assert choice.text == "" and choice.finish_reason == "length" and choice.logprobs.tokens == []
    assert resp.usage.completion_tokens == 0


def test_echo_without_logprobs_prepends_the_prompt(client):
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text and echoed.choices[0].logprobs is None


def test_streamed_echo_equals_the_whole_answer(client):
    kwargs = dict(model="m", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].text.startswith(PROMPT)  # the first chunk carries the prompt
    text = "".join(c.choices[0].text for c in chunks)
    assert text == whole.text
    tokens, token_logprobs, offsets = [], [], []
    for chunk in chunks:
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            token_logprobs += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=ATOL)


def test_streamed_echo_with_max_tokens_zero_is_one_chunk(client, llm):
    chunks = list(client.completions.create(model="m", prompt=PROMPT, echo=True, logprobs=0, max_tokens=0, stream=True))
    (chunk,) = chunks
    choice = chunk.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(llm.encode(PROMPT)) and choice.logprobs.token_logprobs[0] is None


def test_echo_and_max_tokens_are_validated(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=PROMPT, extra_body={"echo": "yes"})
    assert info.value.body["param"] == "echo"


# ---- RTP-LLM's native fields ------------------------------------------------------------------------------------
def _native(url: str, body: dict) -> dict:
    resp = requests.post(url + "/", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_calculate_loss(url, llm, hf):
    ids = llm.encode(PROMPT)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    per_token = _native(url, {"prompt": PROMPT, "calculate_loss": 2, "max_new_tokens": 1, "top_k": 1})
    assert set(per_token) == {"response", "finished", "aux_info", "loss"}
    assert per_token["loss"] == pytest.approx(ce.tolist(), abs=ATOL)
    nested = {"prompt": PROMPT, "generate_config": {"calculate_loss": 1, "max_new_tokens": 0}}
    perplexity = _native(url, nested)
    assert math.isclose(perplexity["loss"], math.exp(float(ce.mean())), rel_tol=1e-4)
    assert perplexity["response"] == "" and perplexity["aux_info"]["output_len"] == 0
    plain = _native(url, {"prompt": PROMPT, "max_new_tokens": 1})
    assert "loss" not in plain and "logits" not in plain


def test_return_logits_with_selected_tokens(url, llm, hf):
    ids = llm.encode(PROMPT)
    word = " fox"
    body = {
        "prompt": PROMPT,
        "generate_config": {"return_logits": True, "select_tokens_id": [5, 7], "select_tokens_str": [word]},
        "max_new_tokens": 1,
        "top_k": 1,
    }
    answer = _native(url, body)
    with torch.no_grad():
        last = hf(torch.tensor([ids])).logits[0, -1].float()
    selected = [5, 7, *llm.encode(word)]
    assert answer["logits"] == [pytest.approx([float(last[t]) for t in selected], abs=ATOL)]
    alias = _native(url, {"prompt": PROMPT, "output_logits": True, "max_new_tokens": 1, "top_k": 1})
    assert len(alias["logits"]) == 1 and len(alias["logits"][0]) == hf.config.vocab_size


def test_native_stream_events_carry_the_loss(url, llm):
    body = {"prompt": PROMPT, "calculate_loss": 2, "max_new_tokens": 3, "top_k": 1, "yield_generator": True}
    resp = requests.post(url + "/", json=body, timeout=60)
    events = [json.loads(e[len(b"data:") :]) for e in resp.content.split(b"\r\n\r\n") if e and e != b"data:[done]"]
    assert len(events) == 3 and all(len(e["loss"]) == len(llm.encode(PROMPT)) - 1 for e in events)
    assert events[-1]["finished"]
