"""200 mixed requests through a speculative engine (both kinds) whose KV cache is small enough to preempt, with the
prefix cache on: greedy and sampled, stop sequences, EOS with min_new_tokens, short and long lengths, logprobs,
penalties and logit_bias (not speculated), and aborts mid-generation. Afterwards every KV block of the target and of
the draft is free and the draft holds no request state.

Driven on the engine thread (``EngineClient.call``), so aborts land at chosen steps and the run is deterministic.
"""

from __future__ import annotations

import random

import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig, SpeculativeConfig
from rtp_mm.llm.engine.engine import LLMEngine
from rtp_mm.llm.engine.request import EngineRequest
from rtp_mm_testing.oracle import perturb, random_prompts, save_hf, tiny_llama

N = 200


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative_load")
    tiny_llama(root / "target", seed=1)
    save_hf(perturb(tiny_llama(seed=1), std=0.003, seed=7), root / "draft")
    return root


def mixed_config(i: int, rng: random.Random) -> GenerateConfig:
    kinds = [
        dict(top_k=1, ignore_eos=True),
        dict(temperature=0.8, top_p=0.9, random_seed=i),
        dict(top_k=5, random_seed=i, logprobs=2),
        dict(top_k=1, stop_words_list=[[rng.randrange(3, 320)], [rng.randrange(3, 320), rng.randrange(3, 320)]]),
        dict(top_k=1, eos_token_id=rng.randrange(3, 320), min_new_tokens=3),
        dict(top_k=1, repetition_penalty=1.2),
        dict(temperature=0.7, logit_bias={rng.randrange(3, 320): 3.0}, random_seed=i),
        dict(top_k=1, max_new_tokens=1),
    ]
    fields = {"max_new_tokens": rng.choice([2, 5, 17, 40])} | kinds[i % len(kinds)]
    return GenerateConfig(**fields)


def drive(engine: LLMEngine) -> dict:
    """Submit N requests in waves, abort every 7th after its third output, step until idle."""
    rng = random.Random(0)
    prompts = random_prompts(320, [rng.randrange(4, 40) for _ in range(N)], seed=1)
    prompts = [p + p[: len(p) // 2] if i % 3 else p for i, p in enumerate(prompts)]
    finished, aborted, outputs, tokens = set(), set(), {}, {}
    pending = [EngineRequest(i, p, mixed_config(i, rng)) for i, p in enumerate(prompts)]
    while pending or engine.has_work:
        for request in pending[:25]:  # waves: new prompts keep arriving while others decode
            assert engine.add(request)[0].accepted
        pending = pending[25:]
        for _ in range(3):
            for out in engine.step():
                outputs[out.request_id] = outputs.get(out.request_id, 0) + 1
                if out.finished:
                    finished.add(out.request_id)
                    tokens[out.request_id] = out.token_ids
        for request_id, count in outputs.items():
            if request_id % 7 == 0 and count >= 3 and request_id not in finished | aborted:
                assert engine.abort(request_id)
                aborted.add(request_id)
    proposer = engine.speculator.proposer if engine.speculator is not None else None
    draft = getattr(proposer, "block_manager", None)
    return {
        "tokens": tokens,
        "finished": finished,
        "aborted": aborted,
        "free": engine.block_manager.num_free_blocks,
        "blocks": engine.block_manager.num_blocks,
        "draft_free": None if draft is None else (draft.num_free_blocks, draft.num_blocks),
        "draft_seqs": len(getattr(proposer, "seqs", {})),
        "stats": engine.stats(),
    }


def run(ckpts, sp: SpeculativeConfig | None) -> dict:
    config = ModelConfig(
        model_type="llama", ckpt_path=ckpts / "target", max_seq_len=128, gen_num_per_circle=4 if sp else 1
    )
    # 40 blocks of 8 tokens for up to 16 sequences of up to 100 tokens: preemption is certain.
    llm = LLM(
        config, kv_cache_blocks=40, concurrency_limit=16, reuse_cache=True, skip_tokenizer_init=True, speculative=sp
    )
    try:
        return llm.client.call(drive, timeout=None)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def plain(ckpts) -> dict:
    return run(ckpts, None)


@pytest.mark.parametrize("kind", ["prompt_lookup", "vanilla"])
def test_no_kv_block_leaks_after_200_mixed_requests(ckpts, plain, kind):
    sp = SpeculativeConfig("prompt_lookup") if kind == "prompt_lookup" else None
    result = run(ckpts, sp or SpeculativeConfig(sp_checkpoint_path=str(ckpts / "draft")))
    assert len(result["finished"]) + len(result["aborted"]) == N and result["aborted"]
    assert result["free"] == result["blocks"]
    if kind == "vanilla":
        assert result["draft_free"][0] == result["draft_free"][1]
    assert result["draft_seqs"] == 0
    stats = result["stats"]
    assert stats["num_preemptions"] > 0 and stats["prefix_hit_tokens"] > 0, stats
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"], stats
    # Greedy requests that ran to their end in both runs (preempted, prefix-cached, stopped by a stop sequence,
    # EOS or length, penalised) produced the same tokens as without speculation.
    greedy = [i for i in result["tokens"].keys() & plain["tokens"].keys() if i % 8 in (0, 3, 4, 5, 7)]
    assert len(greedy) > 80
    assert all(result["tokens"][i] == plain["tokens"][i] for i in greedy)
