"""REUSE_CACHE=1: prefix caching must change what is computed, never what is generated."""

from __future__ import annotations

import torch

from rtp_mm import GenerateConfig
from rtp_mm_testing.oracle import random_prompts, tiny_llama, tiny_llm

GREEDY = GenerateConfig(max_new_tokens=16, top_k=1, ignore_eos=True)


def _model(tmp_path):
    path = tmp_path / "llama"
    tiny_llama(path, seed=5, max_position_embeddings=512)
    return path


def test_shared_prefix_is_reused_and_output_identical(tmp_path):
    path = _model(tmp_path)
    prefix = random_prompts(320, [100], seed=1)[0]
    a, b = (prefix + tail for tail in random_prompts(320, [7, 11], seed=2))
    with tiny_llm(path, "llama") as plain:
        expected = plain.generate([b], GREEDY)[0]
        assert expected.aux_info["reuse_len"] == 0
    with tiny_llm(path, "llama", reuse_cache=True) as llm:
        first = llm.generate([a], GREEDY)[0]
        assert first.aux_info["reuse_len"] == 0
        second = llm.generate([b], GREEDY)[0]
        assert second.aux_info["reuse_len"] == 96  # 100-token prefix, blocks of 8
        assert second.token_ids == expected.token_ids
        again = llm.generate([b], GREEDY)[0]  # the whole prompt is cached now, one token is always recomputed
        assert again.aux_info["reuse_len"] == (len(b) - 1) // 8 * 8
        assert again.token_ids == expected.token_ids
        assert llm.stats()["prefix_hit_tokens"] >= 96


def test_eviction_under_pressure_keeps_serving(tmp_path):
    path = _model(tmp_path)
    prompts = random_prompts(320, [60] * 12, seed=3)
    with tiny_llm(path, "llama", max_seq_len=128) as plain:
        expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    # 40 blocks hold about four 76-token sequences: cached prefixes must be evicted to admit new ones.
    with tiny_llm(path, "llama", reuse_cache=True, kv_cache_blocks=40, max_seq_len=128) as llm:
        for _round in range(2):
            outs = [llm.generate([p], GREEDY)[0] for p in prompts]
            assert [o.token_ids for o in outs] == expected
        stats = llm.stats()
        assert stats["prefix_evictions"] > 0
        assert stats["free_blocks"] == stats["num_blocks"]  # cached blocks are free (ref count 0), none leaked


def test_no_block_leaks_after_200_mixed_requests(tmp_path):
    path = _model(tmp_path)
    g = torch.Generator().manual_seed(11)
    base = random_prompts(320, [40], seed=4)[0]
    prompts = []
    for i in range(200):
        cut = int(torch.randint(1, 40, (1,), generator=g))
        prompts.append(base[:cut] + random_prompts(320, [int(torch.randint(1, 20, (1,), generator=g))], seed=i)[0])
    cfgs = [GenerateConfig(max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)), top_k=1) for _ in prompts]
    with tiny_llm(path, "llama", reuse_cache=True, kv_cache_blocks=64, max_seq_len=128) as llm:
        for start in range(0, 200, 25):
            chunk = zip(prompts[start : start + 25], cfgs[start : start + 25], strict=True)
            reqs = [llm.make_request(p, c) for p, c in chunk]
            outs = llm.client.run(reqs)
            assert all(o.finished for o in outs)
        stats = llm.stats()
        assert stats["free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0
        assert stats["prefix_hit_tokens"] > 0
