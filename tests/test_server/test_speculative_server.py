"""A server whose engine speculates (SP_TYPE=prompt_lookup): each response's aux_info carries its proposed and
accepted counts, /metrics the totals and the acceptance rate, a stream's deltas add up to the whole answer (a step
emits several tokens as one output), and a structured-output request runs without speculation.

Oracles: the same tiny checkpoint served without speculation (identical greedy text), ``LLM.stats()``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtp_mm import LLM, ModelConfig, SpeculativeConfig
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server, openai_client

TEXT = "Hello world, the quick brown fox. Streaming responses arrive."
PROMPT = f"{TEXT} {TEXT} {TEXT}"  # copy-heavy: prompt lookup finds the continuation
GREEDY = {"top_k": 1, "ignore_eos": True, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama_speculative")
    tiny_llama(path, seed=5)
    tiny_bpe_tokenizer(path, [TEXT])
    return path


def serve(ckpt: Path, speculative: SpeculativeConfig | None) -> LLM:
    config = ModelConfig(model_type="llama", ckpt_path=ckpt, gen_num_per_circle=4 if speculative else 1)
    return LLM(config, kv_cache_mem_mb=16, speculative=speculative)


@pytest.fixture(scope="module")
def llm(ckpt):
    llm = serve(ckpt, SpeculativeConfig("prompt_lookup"))
    yield llm
    llm.shutdown()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_aux_info_and_metrics_report_acceptance(url, llm, ckpt):
    before = metrics(url)
    body = post(url, {"prompt": PROMPT, **GREEDY})
    after = metrics(url)
    aux = body["aux_info"]
    assert 0 < aux["sp_accepted_len"] <= aux["sp_proposed_len"]
    assert aux["iter_count"] + aux["sp_accepted_len"] == aux["output_len"] == 24  # steps emitted several tokens
    assert (
        after["rtp_mm_spec_proposed_tokens_total"] - before["rtp_mm_spec_proposed_tokens_total"]
        == (aux["sp_proposed_len"])
    )
    assert (
        after["rtp_mm_spec_accepted_tokens_total"] - before["rtp_mm_spec_accepted_tokens_total"]
        == (aux["sp_accepted_len"])
    )
    stats = llm.stats()
    assert after["rtp_mm_spec_acceptance_rate"] == pytest.approx(
        stats["spec_accepted_tokens"] / stats["spec_proposed_tokens"]
    )
    plain = serve(ckpt, None)  # the same answer without speculation
    try:
        with background_server(plain) as plain_url:
            assert post(plain_url, {"prompt": PROMPT, **GREEDY})["response"] == body["response"]
    finally:
        plain.shutdown()


def test_stream_deltas_add_up_to_the_answer(url):
    client = openai_client(url)
    args = dict(model="m", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1)
    whole = client.completions.create(**args).choices[0]
    chunks = [chunk.choices[0] for chunk in client.completions.create(**args, stream=True) if chunk.choices]
    assert "".join(chunk.text for chunk in chunks) == whole.text
    streamed = [token for chunk in chunks if chunk.logprobs for token in chunk.logprobs.tokens]
    assert streamed == whole.logprobs.tokens and len(streamed) == 24  # every token's logprob, once
    assert len(chunks) < 24  # one event per step, and steps emitted several tokens


def test_a_structured_output_request_is_not_speculated(url, llm):
    proposed = llm.stats()["spec_proposed_tokens"]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    body = post(url, {"prompt": PROMPT, "generate_config": {"json_schema": schema, "max_new_tokens": 8, "top_k": 1}})
    assert body["aux_info"]["sp_proposed_len"] == 0
    assert llm.stats()["spec_proposed_tokens"] == proposed
