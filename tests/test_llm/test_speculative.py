"""Speculative decoding, both kinds (SP_TYPE=prompt_lookup and a draft model), on tiny models and the default model:
greedy output identical to plain decoding (stop conditions included), the requests that are not speculated, the
acceptance counts in aux_info and stats, and the start-up refusals (GEN_NUM_PER_CIRCLE without speculation, a draft
of another vocabulary).

Oracle: the same target checkpoint served without speculation. The draft is a slightly perturbed copy of the target,
so that its proposals are sometimes accepted and sometimes rejected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig, SpeculativeConfig
from rtp_mm.errors import ConfigError
from rtp_mm.llm.engine.engine import LLMEngine
from rtp_mm.llm.engine.prompt_lookup import lookup
from rtp_mm.llm.engine.request import EngineRequest, Request, RequestStatus
from rtp_mm.llm.engine.speculative import speculates
from rtp_mm_testing.oracle import perturb, random_prompts, save_hf, tiny_llama

VOCAB = 320  # TINY_LLAMA's
K = 4  # GEN_NUM_PER_CIRCLE of the speculative engines


def copy_heavy_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of which every other one repeats a stretch of itself, so prompt lookup finds matches both in
    the prompt and in the model's (repetitive) greedy output."""
    prompts = random_prompts(VOCAB, [6 + 3 * i for i in range(n)], seed=seed)
    return [p + p[: len(p) // 2] if i % 2 else p for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    tiny_llama(root / "target", seed=1)
    save_hf(perturb(tiny_llama(seed=1), std=0.003, seed=7), root / "draft")
    tiny_llama(root / "other_vocab", seed=1, vocab_size=300)
    return {name: root / name for name in ("target", "draft", "other_vocab")}


def tiny(ckpt: Path, speculative: SpeculativeConfig | None = None, k: int = K, **engine) -> LLM:
    config = ModelConfig(
        model_type="llama", ckpt_path=ckpt, weight_type="FP32", gen_num_per_circle=k if speculative else 1
    )
    return LLM(config, kv_cache_mem_mb=16, skip_tokenizer_init=True, speculative=speculative, **engine)


@pytest.fixture(scope="module")
def plain(ckpts):
    llm = tiny(ckpts["target"])
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module", params=["prompt_lookup", "vanilla"])
def speculative(request, ckpts):
    sp = SpeculativeConfig("prompt_lookup") if request.param == "prompt_lookup" else draft_config(ckpts["draft"])
    llm = tiny(ckpts["target"], sp)
    yield llm
    llm.shutdown()


def draft_config(path: Path, **fields) -> SpeculativeConfig:
    return SpeculativeConfig("vanilla", sp_checkpoint_path=str(path), **fields)


def stats_delta(llm: LLM, run) -> tuple[object, dict]:
    before = llm.client.stats()
    result = run()
    after = llm.client.stats()
    return result, {key: after[key] - before[key] for key in ("spec_proposed_tokens", "spec_accepted_tokens")}


# ---- prompt lookup -------------------------------------------------------------------------------------------------
def test_lookup_proposes_what_followed_the_latest_earlier_match():
    assert lookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3], k=3, vocab_size=10) == (5, 7, 1)  # latest of two 3-grams
    assert lookup([1, 2, 3, 4, 1, 2], k=5, vocab_size=10) == (3, 4, 1, 2)  # up to the end of the sequence
    assert lookup([5, 1, 2, 8, 6, 7, 1, 2], k=2, vocab_size=10) == (8, 6)  # a 2-gram when no longer one matches
    assert lookup([1, 2, 3, 4, 5], k=3, vocab_size=10) == ()  # nothing recurs
    assert lookup([4, 4], k=3, vocab_size=10) == ()  # too short for a 2-gram with a continuation
    assert lookup([1, 2, -200, 7, 1, 2], k=3, vocab_size=10) == ()  # an image placeholder is never proposed
    assert lookup([1, 2, 3, 12, 1, 2], k=3, vocab_size=10) == (3,)  # nor an id past the vocabulary


def test_sp_token_match_sets_the_ngram_lengths_prompt_lookup_matches(ckpts):
    prompt = [[11, 12, 50, 60, 11, 12]]  # the bigram "11 12" recurs, nothing longer does
    config = GenerateConfig(max_new_tokens=2, top_k=1, ignore_eos=True)  # only the prefill step may propose
    for (low, high), proposes in (((2, 4), True), ((3, 4), False)):
        sp = SpeculativeConfig("prompt_lookup", sp_min_token_match=low, sp_max_token_match=high)
        with tiny(ckpts["target"], sp) as llm:
            out = llm.generate(prompt, config)[0]
        assert (out.aux_info["sp_proposed_len"] > 0) is proposes


# ---- greedy equivalence --------------------------------------------------------------------------------------------
def test_greedy_output_is_identical_on_20_prompts(plain, speculative):
    prompts = copy_heavy_prompts(20)
    config = GenerateConfig(max_new_tokens=40, top_k=1, ignore_eos=True)
    expected = [out.token_ids for out in plain.generate(prompts, config)]
    outs, delta = stats_delta(speculative, lambda: speculative.generate(prompts, config))
    assert [out.token_ids for out in outs] == expected
    assert all(out.finish_reason == "length" for out in outs)
    # Both outcomes were exercised: proposals kept and proposals rejected.
    assert 0 < delta["spec_accepted_tokens"] < delta["spec_proposed_tokens"], delta
    # Fewer steps than tokens, and aux_info counts what the step counts did.
    assert sum(out.aux_info["sp_accepted_len"] for out in outs) == delta["spec_accepted_tokens"]
    assert sum(out.aux_info["sp_proposed_len"] for out in outs) == delta["spec_proposed_tokens"]
    assert sum(out.aux_info["iter_count"] for out in outs) < sum(len(out.token_ids) for out in outs)
    for out in outs:
        assert out.aux_info["iter_count"] + out.aux_info["sp_accepted_len"] == len(out.token_ids)


def test_stop_conditions_apply_token_by_token(plain, speculative):
    """A stop inside an accepted run ends the request there, exactly as plain decoding does."""
    prompts = copy_heavy_prompts(8, seed=3)
    free = plain.generate(prompts, GenerateConfig(max_new_tokens=30, top_k=1, ignore_eos=True))
    for prompt, out in zip(prompts, free, strict=True):
        ids = out.token_ids
        configs = [
            GenerateConfig(max_new_tokens=7, top_k=1, ignore_eos=True),  # length, mid-run
            GenerateConfig(max_new_tokens=30, top_k=1, stop_words_list=[ids[9:11]]),  # a stop sequence
            GenerateConfig(max_new_tokens=30, top_k=1, eos_token_id=ids[12]),  # an EOS
            GenerateConfig(max_new_tokens=30, top_k=1, eos_token_id=ids[2], min_new_tokens=6),  # EOS masked first
        ]
        for config in configs:
            expected, got = plain.generate([prompt], config)[0], speculative.generate([prompt], config)[0]
            assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason), config


def test_rejected_proposals_release_their_blocks_in_the_same_step(speculative):
    """After every step each running request holds no block beyond those its known tokens need, and has computed
    all of them but the last (the blocks and KV of rejected proposals are gone)."""

    def drive(engine: LLMEngine) -> tuple[int, int]:
        bm = engine.block_manager
        config = GenerateConfig(max_new_tokens=30, top_k=1, ignore_eos=True)
        for i, prompt in enumerate(copy_heavy_prompts(6, seed=11)):
            assert engine.add(EngineRequest(10_000 + i, prompt, config))[0].accepted
        steps = 0
        while engine.has_work:
            engine.step()
            running = [r for r in engine.requests.values() if r.status is RequestStatus.RUNNING]
            assert bm.num_used_blocks == sum(len(r.block_table) for r in running)
            for r in running:  # the next token's slot may still be missing (the scheduler adds it), never more
                assert bm.blocks_needed(r.num_tokens - 1) <= len(r.block_table) <= bm.blocks_needed(r.num_tokens)
                assert r.num_computed_tokens == r.num_tokens - 1
            steps += 1
        return steps, bm.num_free_blocks - bm.num_blocks

    steps, leaked = speculative.client.call(drive, timeout=None)
    assert steps < 30 and leaked == 0  # fewer steps than tokens: proposals were accepted


def test_logprobs_and_logits_of_each_emitted_token_match_plain_decoding(plain, speculative):
    prompts = copy_heavy_prompts(4, seed=5)
    config = GenerateConfig(max_new_tokens=16, top_k=1, ignore_eos=True, logprobs=3)
    for expected, got in zip(plain.generate(prompts, config), speculative.generate(prompts, config), strict=True):
        assert got.token_ids == expected.token_ids
        for e, g in zip(expected.logprobs, got.logprobs, strict=True):
            assert e.keys() == g.keys() and all(abs(e[t] - g[t]) < 1e-4 for t in e)
    config = GenerateConfig(max_new_tokens=9, top_k=1, ignore_eos=True, return_logits=True, select_tokens_id=[3, 4])
    expected, got = plain.generate(prompts[:1], config)[0], speculative.generate(prompts[:1], config)[0]
    assert got.logits == pytest.approx(expected.logits, abs=1e-4)


@pytest.mark.parametrize(
    "fields",
    [{"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"logit_bias": {7: 2.0}}],
    ids=["repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"],
)
def test_requests_whose_distribution_depends_on_earlier_tokens_are_not_speculated(plain, speculative, fields):
    prompts = copy_heavy_prompts(4, seed=9)
    config = GenerateConfig(max_new_tokens=20, top_k=1, ignore_eos=True, **fields)
    outs, delta = stats_delta(speculative, lambda: speculative.generate(prompts, config))
    assert delta["spec_proposed_tokens"] == 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(prompts, config)]
    assert all(o.aux_info["sp_proposed_len"] == 0 for o in outs)


def test_a_request_with_a_grammar_is_not_speculated():
    plain = Request(1, [1, 2], GenerateConfig(), max_total_len=10)
    assert speculates(plain)
    assert not speculates(dataclasses.replace(plain, grammar=object()))  # its mask depends on the tokens before


# ---- configuration -------------------------------------------------------------------------------------------------
def test_gen_num_per_circle_without_speculation_is_refused_at_start_up(ckpts):
    with pytest.raises(ConfigError, match="GEN_NUM_PER_CIRCLE=3 takes effect only with speculative decoding"):
        LLM(ModelConfig(model_type="llama", ckpt_path=ckpts["target"], gen_num_per_circle=3), kv_cache_mem_mb=16)


def test_a_draft_with_another_vocabulary_is_refused_at_start_up(ckpts):
    with pytest.raises(ConfigError, match="vocabulary of 300 tokens and the target model 320"):
        tiny(ckpts["target"], draft_config(ckpts["other_vocab"]))


def test_gen_num_per_circle_is_the_most_tokens_proposed_per_step(ckpts):
    """With the target as its own draft every proposal is kept: a step emits GEN_NUM_PER_CIRCLE + 1 tokens."""
    for k in (1, 3):
        llm = tiny(ckpts["target"], draft_config(ckpts["target"]), k=k)
        try:
            out = llm.generate([[5, 6, 7]], GenerateConfig(max_new_tokens=2 + 4 * (k + 1), top_k=1, ignore_eos=True))[0]
        finally:
            llm.shutdown()
        # The prefill step verifies k proposals too: 4 steps of k + 1 tokens and a last step of 2 (the length cap).
        assert out.aux_info["iter_count"] == 5, out.aux_info
        assert out.aux_info["sp_accepted_len"] == out.aux_info["sp_proposed_len"] == 4 * k + 1


# ---- the default model ---------------------------------------------------------------------------------------------
DEFAULT_TEXTS = [
    "Rewrite this sentence in the same words: The quick brown fox jumps over the lazy dog near the river bank.",
    "Repeat exactly: Alice went to the market on Monday and bought apples, pears and a loaf of bread.",
    "Summarise, quoting the key phrase: 'The meeting is moved to Thursday at noon in room 204.'",
    "Copy this list: red, green, blue, yellow, orange, purple, black, white.",
    "Quote the first line and explain it: 'To be, or not to be, that is the question.'",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt_lookup", "vanilla"])
def test_greedy_output_is_identical_on_the_default_model(default_llm, kind):
    from rtp_mm.default_model import default_model_path

    # The draft: the default checkpoint itself with int8 weights, close to the fp32 target but not identical.
    sp = SpeculativeConfig("prompt_lookup") if kind == "prompt_lookup" else None
    sp = sp or SpeculativeConfig(
        sp_model_type="llama", sp_checkpoint_path=str(default_model_path()), sp_weight_type="INT8"
    )
    llm = LLM(ModelConfig(weight_type="FP32", gen_num_per_circle=K), kv_cache_mem_mb=256, speculative=sp)
    try:
        prompts = [
            llm.chat_ids([{"role": "user", "content": text + suffix}])
            for text in DEFAULT_TEXTS
            for suffix in ("", " Be brief.", " Thank you.", " Answer in one line.")
        ]
        config = GenerateConfig(max_new_tokens=24, top_k=1)
        expected = default_llm.generate(prompts, config)
        outs, delta = stats_delta(llm, lambda: llm.generate(prompts, config))
    finally:
        llm.shutdown()
    assert len(prompts) == 20
    assert [out.token_ids for out in outs] == [out.token_ids for out in expected]
    assert [out.text for out in outs] == [out.text for out in expected]
    assert delta["spec_accepted_tokens"] > 0, delta
