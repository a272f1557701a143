"""The Triton backend swapped into a whole model (``transforms.use_triton_kernels``, what start-up does on CUDA) never
changes greedy output against the torch reference ops: run here through Triton's interpreter on CPU (tiny models:
GQA, ALiBi, INT8 weights with INT8 KV, chunked prefill), and on CUDA under the ``gpu`` marker."""

from __future__ import annotations

import pytest
import torch

from rtp_mm import GenerateConfig
from rtp_mm.llm.models.transforms import use_triton_kernels
from rtp_mm_testing.oracle import random_prompts, tiny_llm
from rtp_mm_testing.tp_cases import CASES

pytest.importorskip("triton", reason="the triton package is not installed")  # (tests/conftest.py: TRITON_INTERPRET)

GREEDY = GenerateConfig(max_new_tokens=6, top_k=1, ignore_eos=True, logprobs=2)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case,weight_type,int8_kv",
    [("llama_gqa", "FP32", False), ("bloom_alibi", "FP32", False), ("qwen_2_bias_untied_head", "INT8", True)],
)
def test_triton_backend_keeps_greedy_output(tmp_path, case, weight_type, int8_kv, device):
    build, model_type, vocab = CASES[case]
    path = build(tmp_path / case)
    # A 16-token step budget splits the 21-token prompt into chunks: later chunks read the cache through the kernel.
    prompts = random_prompts(vocab, [5, 21, 9], seed=7)
    engine = dict(int8_kv_cache=int8_kv, max_num_batched_tokens=16, device=device)
    with tiny_llm(path, model_type, weight_type=weight_type, **engine) as llm:
        reference = llm.generate(prompts, GREEDY)
        swapped = llm.client.call(lambda engine: use_triton_kernels(engine.runner.model))
        fast = llm.generate(prompts, GREEDY)
    assert "paged attention" in swapped and ("int8 GEMM" in swapped) == (weight_type == "INT8")
    assert ("rotary" in swapped) == (case != "bloom_alibi")
    for ref, out in zip(reference, fast, strict=True):
        assert out.token_ids == ref.token_ids
        for a, b in zip(ref.logprobs, out.logprobs, strict=True):
            for token, lp in a.items():
                assert abs(b[token] - lp) < 1e-4
