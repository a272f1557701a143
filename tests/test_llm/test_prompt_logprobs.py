"""Prompt logits in the prefill: prompt_logprobs, calculate_loss, return_logits and max_new_tokens=0, against HF
transformers' log_softmax of the whole prompt (an independent oracle), with one-chunk and chunked prefill, prefix
reuse on, and requests that want them batched with requests that do not."""

from __future__ import annotations

import math

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.engine import model_runner
from rtp_mm_testing.oracle import random_prompts, tiny_llama, tiny_llm

ATOL = 1e-4
VOCAB = 320


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt_logprobs_llama")
    tiny_llama(path, seed=7, max_position_embeddings=512)
    return path


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32).eval()


@torch.no_grad()
def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row p is log P(. | prompt[:p + 1])."""
    return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def check_prompt_logprobs(out, prompt: list[int], ref: torch.Tensor, top_n: int) -> None:
    assert out.prompt_token_ids == prompt
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    for p in range(1, len(prompt)):
        entry, row = entries[p], ref[p - 1]
        assert abs(entry[prompt[p]] - float(row[prompt[p]])) < ATOL, (p, entry[prompt[p]], float(row[prompt[p]]))
        top = set(torch.topk(row, top_n).indices.tolist())
        assert set(entry) == top | {prompt[p]}, p
        assert all(abs(lp - float(row[t])) < ATOL for t, lp in entry.items())


@pytest.mark.parametrize("budget", [512, 16], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_match_hf(model_path, hf, budget, monkeypatch):
    # Fewer rows per logits slice than the prompt has: the slicing inside one chunk is exercised too.
    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_ROWS", 7)
    prompts = random_prompts(VOCAB, [41, 5, 2], seed=3)
    config = GenerateConfig(max_new_tokens=3, top_k=1, ignore_eos=True, prompt_logprobs=4, logprobs=2)
    with tiny_llm(model_path, "llama", max_num_batched_tokens=budget) as llm:
        outs = llm.generate(prompts, config)
        assert llm.stats()["free_blocks"] == llm.stats()["num_blocks"]
    for prompt, out in zip(prompts, outs, strict=True):
        check_prompt_logprobs(out, prompt, hf_prompt_logprobs(hf, prompt), 4)
        assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_a_one_token_prompt_has_only_the_empty_first_entry(model_path):
    with tiny_llm(model_path, "llama") as llm:
        (out,) = llm.generate([[17]], GenerateConfig(max_new_tokens=1, top_k=1, prompt_logprobs=0))
    assert out.prompt_logprobs == [None] and out.prompt_token_ids == [17]


def test_max_new_tokens_zero_is_the_prefill_only(model_path, hf):
    prompts = random_prompts(VOCAB, [30, 9, 1], seed=4)  # a one-token prefill is scheduled as a "decode"
    config = GenerateConfig(max_new_tokens=0, prompt_logprobs=1)
    with tiny_llm(model_path, "llama", max_num_batched_tokens=8) as llm:
        outs = llm.generate(prompts, config)
        plain = llm.generate(prompts, GenerateConfig(max_new_tokens=0))
        stats = llm.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0
    for prompt, out, bare in zip(prompts, outs, plain, strict=True):
        assert out.finished and out.finish_reason == "length" and out.token_ids == [] and out.text == ""
        assert out.aux_info["output_len"] == 0 and out.aux_info["input_len"] == len(prompt)
        check_prompt_logprobs(out, prompt, hf_prompt_logprobs(hf, prompt), 1)
        assert bare.finish_reason == "length" and bare.token_ids == [] and bare.prompt_logprobs is None


def test_prefix_reuse_is_skipped_for_prompt_logprobs(model_path, hf):
    """Cached blocks would skip their positions' logits: a request wanting them computes its whole prompt."""
    prompt = random_prompts(VOCAB, [50], seed=5)[0]
    greedy = GenerateConfig(max_new_tokens=2, top_k=1, ignore_eos=True)
    with tiny_llm(model_path, "llama", reuse_cache=True) as llm:
        llm.generate([prompt], greedy)  # fills the prefix cache
        (out,) = llm.generate([prompt], greedy.updated(prompt_logprobs=2, calculate_loss=2))
        (again,) = llm.generate([prompt], greedy)
    assert out.aux_info["reuse_len"] == 0
    check_prompt_logprobs(out, prompt, hf_prompt_logprobs(hf, prompt), 2)
    assert again.aux_info["reuse_len"] == 48  # the cache still serves requests that do not need the logits
    assert again.token_ids == out.token_ids


def test_calculate_loss_matches_hf_cross_entropy(model_path, hf):
    prompts = random_prompts(VOCAB, [23, 2], seed=6)
    with tiny_llm(model_path, "llama", max_num_batched_tokens=8) as llm:
        per_token = llm.generate(prompts, GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2))
        perplexity = llm.generate(prompts, GenerateConfig(max_new_tokens=0, calculate_loss=1))
        with pytest.raises(InvalidRequest, match="at least 2 tokens"):
            llm.generate([[5]], GenerateConfig(max_new_tokens=1, calculate_loss=1))
    for prompt, a, b in zip(prompts, per_token, perplexity, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0].float()
        ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(prompt[1:]), reduction="none")
        assert len(a.loss) == len(prompt) - 1
        assert max(abs(x - y) for x, y in zip(a.loss, ce.tolist(), strict=True)) < ATOL
        assert math.isclose(b.loss, math.exp(float(ce.mean())), rel_tol=1e-4)
        assert a.prompt_logprobs is None  # calculate_loss alone does not return the entries


def test_return_logits_are_the_raw_logits_of_the_last_token(model_path, hf):
    prompt = random_prompts(VOCAB, [12], seed=8)[0]
    select = [3, 100, 319, 3]
    config = GenerateConfig(max_new_tokens=2, top_k=1, ignore_eos=True, return_logits=True)
    with tiny_llm(model_path, "llama") as llm:
        (full,) = llm.generate([prompt], config)
        (some,) = llm.generate([prompt], config.updated(select_tokens_id=select))
        with pytest.raises(InvalidRequest, match=r"select_tokens_id \[320, -1\] are outside the vocabulary"):
            llm.generate([prompt], config.updated(select_tokens_id=[1, 320, -1]))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + full.token_ids[:1]])).logits[0, -1].float()
    assert len(full.logits) == VOCAB
    assert max(abs(a - b) for a, b in zip(full.logits, ref.tolist(), strict=True)) < ATOL
    assert some.logits == pytest.approx([float(ref[t]) for t in select], abs=ATOL)


def test_mixed_batch_only_computes_what_each_request_asked_for(model_path, hf):
    prompts = random_prompts(VOCAB, [19, 33, 8], seed=9)
    configs = [
        GenerateConfig(max_new_tokens=4, top_k=1, ignore_eos=True, prompt_logprobs=3),
        GenerateConfig(max_new_tokens=4, top_k=1, ignore_eos=True),
        GenerateConfig(max_new_tokens=0, prompt_logprobs=0),
    ]
    with tiny_llm(model_path, "llama", max_num_batched_tokens=24) as llm:
        outs = llm.client.run([llm.make_request(p, c) for p, c in zip(prompts, configs, strict=True)])
        (alone,) = llm.generate([prompts[1]], configs[1])
    check_prompt_logprobs(outs[0], prompts[0], hf_prompt_logprobs(hf, prompts[0]), 3)
    assert outs[1].prompt_logprobs is None and outs[1].token_ids == alone.token_ids
    check_prompt_logprobs(outs[2], prompts[2], hf_prompt_logprobs(hf, prompts[2]), 0)
    assert outs[2].token_ids == [] and outs[2].finish_reason == "length"


def test_preemption_recomputes_without_duplicating_entries(model_path, hf):
    """A preempted request recomputes its prompt: positions already recorded are not recorded twice."""
    prompts = random_prompts(VOCAB, [40, 40, 40], seed=10)
    config = GenerateConfig(max_new_tokens=24, top_k=1, ignore_eos=True, prompt_logprobs=1, calculate_loss=2)
    with tiny_llm(model_path, "llama", max_seq_len=128, kv_cache_blocks=16, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, config)
        assert llm.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs, strict=True):
        check_prompt_logprobs(out, prompt, hf_prompt_logprobs(hf, prompt), 1)
        assert len(out.loss) == len(prompt) - 1
