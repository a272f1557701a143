"""Tensor parallelism on CPU with gloo: TP=2 (real processes, spawned by the offline API's rank 0) gives the greedy
tokens of TP=1, logprobs within 1e-4, for each sharding case (GQA, biases and an untied head, 2 kv groups, ALiBi, MQA
with a replicated kv head, a multimodal model with images), with TP_SPLIT_EMB_AND_LMHEAD on and off; each rank holds
about half the weights; a model TP_SIZE does not divide is refused before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.errors import ConfigError
from rtp_mm.parallel_config import ParallelConfig
from rtp_mm_testing.golden_legacy import assert_greedy_golden, golden_case
from rtp_mm_testing.oracle import random_prompts, save_hf, tiny_llama, tiny_llm
from rtp_mm_testing.shared import GOLDEN
from rtp_mm_testing.tp_cases import CASES

GREEDY = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=3)
LENGTHS = [5, 11, 23, 3]


def _run(path: Path, model_type: str, prompts: list, tp: int, split: bool = True, images: list | None = None) -> tuple:
    parallel = ParallelConfig(tp_size=tp)
    with tiny_llm(path, model_type, max_seq_len=1024, parallel=parallel, tp_split_emb_and_lmhead=split) as llm:
        outs = llm.generate(prompts, GREEDY, images=images) if images else llm.generate(prompts, GREEDY)
        return outs, llm.client.info.rank_weight_bytes


def _assert_same(ref: list, outs: list, what: str) -> None:
    for a, b in zip(ref, outs, strict=True):
        assert b.token_ids == a.token_ids, what
        for step, (ea, eb) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
            for token, lp in ea.items():
                assert abs(eb[token] - lp) < 1e-4, (what, step, token, eb[token], lp)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(tmp_path, case):
    build, model_type, vocab = CASES[case]
    path = build(tmp_path / case)
    prompts = random_prompts(vocab, LENGTHS, seed=3)
    ref, (tp1_bytes,) = _run(path, model_type, prompts, 1)
    for split in (True, False):
        outs, per_rank = _run(path, model_type, prompts, 2, split)
        _assert_same(ref, outs, f"{case} split={split}")
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
        # Sharded layers are halved; norms (and, without the split, the embedding and head) are whole on each rank.
        assert per_rank[0] < 0.75 * tp1_bytes, (case, split, per_rank, tp1_bytes)
        if split:
            assert per_rank[0] < 0.55 * tp1_bytes, (case, per_rank, tp1_bytes)


def test_tp2_multimodal_qwen_vl_matches_the_original():
    """qwen_vl (sharded .bin, Qwen v1 fused c_attn): rank 0 encodes the images; their rows reach every rank in the
    broadcast batch and are spliced after the (vocab-parallel or replicated) embedding. Checked against the golden
    outputs of the original implementation, and against TP=1."""
    ckpt, inputs, expected = golden_case("qwen_vl")
    prompts = [item["input_ids"] for item in inputs]
    images = [[str(GOLDEN / "qwen_vl" / name) for name in item.get("images", [])] for item in inputs]
    assert any(images)
    ref, _ = _run(ckpt, "qwen_vl", prompts, 1, images=images)
    for split in (True, False):
        outs, _ = _run(ckpt, "qwen_vl", prompts, 2, split, images=images)
        assert_greedy_golden(outs, inputs, expected)
        _assert_same(ref, outs, f"qwen_vl split={split}")


def test_heads_tp_size_does_not_divide_are_refused_naming_both(tmp_path):
    path = save_hf(tiny_llama(), tmp_path / "llama")  # 4 heads, 2 kv heads
    with pytest.raises(ConfigError, match=r"TP_SIZE=3 does not divide the 4 attention heads"):
        tiny_llm(path, "llama", parallel=ParallelConfig(tp_size=3))


def test_settings_tensor_parallel_cannot_serve_are_refused(tmp_path):
    path = save_hf(tiny_llama(), tmp_path / "llama")
    with pytest.raises(ConfigError, match="LORA_INFO"):
        from rtp_mm import LLM, ModelConfig

        LLM(
            ModelConfig(model_type="llama", ckpt_path=str(path), lora_infos={"a": str(tmp_path)}, weight_type="FP32"),
            parallel=ParallelConfig(tp_size=2),
            kv_cache_mem_mb=4,
            skip_tokenizer_init=True,
        )


def test_readers_decode_only_a_ranks_rows(tmp_path):
    """A rank's rows come from the file: GGUF cuts quantized rows before decoding them (q/k un-permuted per head),
    safetensors and memory-mapped .bin read the slice; a tensor not as long as the plan expects comes whole."""
    from safetensors.torch import save_file

    from rtp_mm.default_model import default_model_path
    from rtp_mm.llm.loader import open_checkpoint

    with open_checkpoint(default_model_path()) as gguf:  # Q4_1: 9 heads, 3 kv heads of 64
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            full = gguf.get(f"model.layers.0.self_attn.{name}.weight")
            rows = full.shape[0]
            part = gguf.get(f"model.layers.0.self_attn.{name}.weight", (0, rows // 3, 2 * rows // 3, rows))
            assert torch.equal(part, full[rows // 3 : 2 * rows // 3]), name
        embed = gguf.get("model.embed_tokens.weight")
        assert torch.equal(gguf.get("model.embed_tokens.weight", (0, 0, 10, embed.shape[0] + 1)), embed)  # whole
    tensors = {"a": torch.randn(12, 6), "b": torch.randn(6, 12)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    plan = {"a": (0, 4, 8, 12), "b": (1, 6, 12, 12)}
    for folder in (tmp_path, tmp_path / "bin"):
        with open_checkpoint(folder) as ckpt:
            got = dict(ckpt.iter_tensors(plan.get))
        assert torch.equal(got["a"], tensors["a"][4:8]) and torch.equal(got["b"], tensors["b"][:, 6:12]), folder


def test_tp3_default_gguf_model_matches_tp1():
    """The real default model (GGUF Q4_1; 9 heads, 3 kv heads, 49152 tokens) over 3 ranks: each rank decodes only
    its rows of every quantized tensor (q/k un-permuted per head) and the tokens are TP=1's."""
    from rtp_mm import LLM, ModelConfig
    from rtp_mm.default_model import default_model_path

    prompts = random_prompts(49152, [7, 19], seed=4)
    outs = []
    for tp in (1, 3):
        model = ModelConfig(
            model_type="llama", ckpt_path=str(default_model_path()), weight_type="FP32", max_seq_len=256
        )
        parallel = ParallelConfig(tp_size=tp)
        with LLM(model, kv_cache_mem_mb=32, skip_tokenizer_init=True, parallel=parallel) as llm:
            outs.append((llm.generate(prompts, GREEDY), llm.client.info.rank_weight_bytes))
    (ref, (whole,)), (got, per_rank) = outs
    _assert_same(ref, got, "default model TP=3")
    assert len(per_rank) == 3 and max(per_rank) < 0.4 * whole, (per_rank, whole)


def test_tp2_prompt_lookup_speculation_and_prompt_logprobs(tmp_path):
    """Work beyond plain steps reaches the workers too: speculative verification rows (SP_TYPE=prompt_lookup) and
    prompt logprobs (several head calls per step) give TP=1's tokens and logprobs under TP=2."""
    from rtp_mm import LLM, ModelConfig, SpeculativeConfig

    path = save_hf(tiny_llama(), tmp_path / "llama")
    prompts = [p * 3 for p in random_prompts(320, [4, 6], seed=8)]  # repeats: prompt lookup finds proposals
    config = GenerateConfig(max_new_tokens=12, top_k=1, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = []
    for tp in (1, 2):
        model = ModelConfig(model_type="llama", ckpt_path=str(path), weight_type="FP32", gen_num_per_circle=4)
        sp = SpeculativeConfig("prompt_lookup")
        parallel = ParallelConfig(tp_size=tp)
        with LLM(model, kv_cache_mem_mb=16, skip_tokenizer_init=True, speculative=sp, parallel=parallel) as llm:
            outs.append(llm.generate(prompts, config))
    _assert_same(outs[0], outs[1], "prompt lookup")
    assert any(out.aux_info["sp_proposed_len"] for out in outs[1])
    for a, b in zip(*outs, strict=True):
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert all(abs(eb[t] - lp) < 1e-4 for t, lp in ea.items())


def test_tp2_embedding_model_matches_the_golden_embeddings():
    """sgpt_bloom_vector under TP=2: rank 0 announces each embedding forward (prompts, not a step) and the workers run
    it too; the pooled vectors match the golden SGPT-BLOOM embeddings as TP=1 does."""
    import json

    from safetensors.torch import load_file

    from rtp_mm import LLM, ModelConfig

    folder = GOLDEN / "sgpt_bloom_vector"
    inputs = {case["name"]: case for case in json.loads((folder / "inputs.json").read_text())}
    expected = load_file(str(folder / "expected.safetensors"))
    model = ModelConfig(model_type="sgpt_bloom_vector", ckpt_path=str(folder / "checkpoint"), weight_type="FP32")
    with LLM(model, kv_cache_mem_mb=16, skip_tokenizer_init=True, parallel=ParallelConfig(tp_size=2)) as llm:
        for name in ("query", "document", "plain_long"):
            got = llm.embed([inputs[name]["input_ids"]])[0]
            want = expected[f"embedding_{name}"]
            cosine = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=0)
            assert float(cosine) >= 0.9999, name
