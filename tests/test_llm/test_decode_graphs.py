"""Decode graphs (llm/engine/cuda_graphs.py, PRE_ALLOCATE_OP_MEM=1): replays over persistent, padded step buffers give
the eager forward's greedy tokens and logprobs.

On CPU the capture is ``EagerGraph`` (replay re-runs the captured function on the same buffers), which checks
everything but the CUDA capture itself: buffer copies, padding to the next size, the pad block no sequence owns and
the widest block tables. The same comparison runs with real CUDA graphs under the ``gpu`` marker."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.kernels import attention
from rtp_mm.llm.engine import cuda_graphs
from rtp_mm.llm.engine.cuda_graphs import DecodeGraphs, capture_sizes, graph_refusal
from rtp_mm.llm.engine.model_runner import ModelRunner
from rtp_mm_testing.oracle import random_prompts, tiny_llm
from rtp_mm_testing.tp_cases import CASES

GREEDY = GenerateConfig(max_new_tokens=7, top_k=1, ignore_eos=True, logprobs=2)


def test_capture_sizes_stop_at_the_concurrency_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(1000)[-1] == 256


def _run(tmp_path, monkeypatch, case, weight_type, graphs: bool, device="cpu", **kw):
    build, model_type, vocab = CASES[case]
    path = tmp_path / f"{case}-{graphs}"
    build(path)
    if graphs:
        monkeypatch.setattr(cuda_graphs, "CAPTURE_DEVICES", ("cuda", "cpu"))
    replays = []
    run = DecodeGraphs.run

    def counted(self, batch, inputs):
        out = run(self, batch, inputs)
        replays.append(None if out is None else out.shape[0])
        return out

    monkeypatch.setattr(DecodeGraphs, "run", counted)
    try:
        # Five prompts together, the longest chunked by the 16-token budget: decode steps of 1 to 5 rows.
        prompts = random_prompts(vocab, [5, 21, 9, 3, 12], seed=11)
        engine = dict(max_num_batched_tokens=16, concurrency_limit=8, device=device, **kw)
        with tiny_llm(path, model_type, weight_type=weight_type, **engine) as llm:
            blocks = llm.stats()["num_blocks"]
            return llm.generate(prompts, GREEDY), replays, blocks
    finally:
        monkeypatch.undo()


def _assert_same(reference, fast, tol=1e-5):
    for ref, out in zip(reference, fast, strict=True):
        assert out.token_ids == ref.token_ids
        for a, b in zip(ref.logprobs, out.logprobs, strict=True):
            for token, lp in a.items():
                assert abs(b[token] - lp) < tol


@pytest.mark.parametrize(
    "case,weight_type,kw",
    [
        ("llama_gqa", "FP32", {}),
        ("llama_gqa", "INT8", {}),  # the CPU whole-stack decode inside the graph
        ("qwen_2_bias_untied_head", "FP32", {}),
        ("falcon_mqa", "FP32", {}),
    ],
)
def test_replays_match_the_eager_forward(tmp_path, monkeypatch, case, weight_type, kw):
    reference, none, eager_blocks = _run(tmp_path, monkeypatch, case, weight_type, False, **kw)
    fast, replays, graph_blocks = _run(tmp_path, monkeypatch, case, weight_type, True, **kw)
    assert none == []  # no graphs without CAPTURE_DEVICES
    replayed = [n for n in replays if n is not None]
    assert len(replayed) >= 5 and {1, 3, 5} <= set(replayed)  # padded sizes (3 -> 4, 5 -> 8) were replayed
    assert None in replays  # steps with prefill chunks ran eagerly
    assert graph_blocks == eager_blocks - 1  # the pad block is not the block manager's
    _assert_same(reference, fast)


def test_models_graphs_cannot_capture_say_why(tmp_path):
    build, model_type, _ = CASES["llama_gqa"]
    with tiny_llm(build(tmp_path / "llama"), model_type) as llm:
        model, runner = llm.client.call(lambda engine: (engine.runner.model, engine.runner))
        assert graph_refusal(model, runner) is None  # the CPU kernels' attention reads lengths from tensors
        attend = model.layers[0].attn.attend
        model.layers[0].attn.attend = attention.paged_attention
        try:
            assert "reads context lengths on the host" in graph_refusal(model, runner)
        finally:
            model.layers[0].attn.attend = attend
        int8_kv = llm.client.call(lambda engine: ModelRunner(model, 4, 16, int8_kv=True))
        assert "reads context lengths on the host" in graph_refusal(model, int8_kv)  # CPU: fp32 caches only
        spec = model.rotary.spec
        model.rotary.spec = dataclasses.replace(spec, scaling="dynamic")
        try:
            assert graph_refusal(model, runner) == "rope scaling 'dynamic' picks frequencies on the host"
        finally:
            model.rotary.spec = spec


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replays_match_eager_on_cuda(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    reference, _, _ = _run(tmp_path, monkeypatch, "llama_gqa", "FP32", False, device="cuda", pre_allocate_op_mem=False)
    fast, replays, _ = _run(tmp_path, monkeypatch, "llama_gqa", "FP32", False, device="cuda")
    assert any(n is not None for n in replays)
    _assert_same(reference, fast, tol=1e-3)
