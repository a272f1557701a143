"""Prompt-lookup speculation on the families whose prompts are laid out differently: GLM v1's prefix-LM (a
bidirectional prompt, 2D positions), Qwen v1's dynamic NTK and logn (scaled by the sequence length each row sees),
Baichuan-13B's ALiBi, and llava's image rows spliced into the prompt. Greedy tokens equal the original
implementations' (golden data) or HF transformers'; the logprobs of each step as well.
"""

from __future__ import annotations

import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig, SpeculativeConfig
from rtp_mm_testing.golden_legacy import assert_greedy_golden, golden_case
from rtp_mm_testing.llava import IMAGE_TOKEN, NEW_TOKENS, SIZES, hf_generate, image, processor, save_llava, tiny_llava


def serve(path, model_type: str, lookup: bool = True, **engine) -> LLM:
    """The checkpoint with prompt-lookup speculation (GEN_NUM_PER_CIRCLE=4), or without any."""
    config = ModelConfig(
        model_type=model_type,
        ckpt_path=str(path),
        max_seq_len=512,
        weight_type="FP32",
        gen_num_per_circle=4 if lookup else 1,
    )
    sp = SpeculativeConfig("prompt_lookup") if lookup else None
    return LLM(config, kv_cache_mem_mb=16, skip_tokenizer_init=True, speculative=sp, **engine)


@pytest.mark.parametrize(
    "case,model_type,copy",
    [("chatglm_v1", "chatglm", False), ("qwen_7b", "qwen_7b", True), ("baichuan_13b", "baichuan", True)],
)
def test_golden_greedy_with_prompt_lookup(case, model_type, copy):
    ckpt, inputs, expected = golden_case(case)
    config = GenerateConfig(max_new_tokens=8, top_k=1, logprobs=5, ignore_eos=True)
    prompts = [item["input_ids"] for item in inputs]
    # Copy-heavy prompts (each one twice over, longer answers), against the same model without speculation (itself
    # checked against the golden data by the family tests): lookup proposes more there, past Qwen's seq_length too.
    copies = [p + p for p in prompts] if copy else []
    long = GenerateConfig(max_new_tokens=24, top_k=1, logprobs=5, ignore_eos=True)
    with serve(ckpt, model_type, lookup=False) as plain:
        expected_copies = plain.generate(copies, long) if copies else []
    with serve(ckpt, model_type) as llm:
        for outs in ([llm.generate([p], config)[0] for p in prompts], llm.generate(prompts, config)):
            assert_greedy_golden(outs, inputs, expected)
        outs = llm.generate(copies, long) if copies else []
        stats = llm.client.stats()
    assert [out.token_ids for out in outs] == [out.token_ids for out in expected_copies]
    for got, want in zip(outs, expected_copies, strict=True):
        for g, w in zip(got.logprobs, want.logprobs, strict=True):
            assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-4 for t in g)
    assert stats["spec_proposed_tokens"] > 0, stats


def test_llava_image_prompts_with_prompt_lookup(tmp_path):
    model, proc = tiny_llava("llava"), processor("llava")
    path, extra = save_llava(model, proc, tmp_path / "llava", "save_pretrained")
    images = [image(SIZES[0], 0), image(SIZES[1], 1)]
    chunks = [[1, 7, 9, 7, 9], [33, 12, 7, 9], [40, 7]]  # "7 9" recurs around the images
    prompt = [t for chunk in chunks[:-1] for t in (*chunk, IMAGE_TOKEN)] + chunks[-1]
    config = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True)
    with serve(path, "llava", extra_data_path=extra) as llm:
        (out,) = llm.generate([prompt], config, images=[images])
        stats = llm.client.stats()
    assert out.token_ids == hf_generate(model, proc, chunks, images)
    assert stats["spec_proposed_tokens"] > 0, stats
