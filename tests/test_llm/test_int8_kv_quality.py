"""INT8_KV_CACHE quality on the default model (SmolLM2-135M-Instruct): teacher-forced along the fp32-KV greedy path,
the int8-KV top-1 agrees at >= 99% of the generated positions and the path token's logprob moves < 0.05 on average.

Teacher forcing compares every position against the same context, so one early flip cannot make the rest of a
continuation differ. Both engines use WEIGHT_TYPE=FP32, so only the KV cache differs.
"""

from __future__ import annotations

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.kernels.attention import Int8KVCache

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 10.",
    "How do I reverse a list in Python?",
    "Give me a tip for learning a new language.",
    "What causes the seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
]
NEW_TOKENS = 64
# A prefill chunk starting at position 0 attends to its own unquantized K/V (Int8KVCache): one-chunk prompts would
# never read the int8 values. With chunks this small every generated position lies in a later chunk, which reads its
# whole context, itself included, from the int8 cache, as a decode step does.
CHUNK_TOKENS = 16


def test_int8_kv_teacher_forced_agreement(default_llm):
    prompts = [default_llm.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert min(map(len, prompts)) > CHUNK_TOKENS
    greedy = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True, logprobs=1)
    refs = default_llm.generate(prompts, greedy)  # the fixture's engine: FP32 weights, fp32 KV
    forced = [prompt + ref.token_ids for prompt, ref in zip(prompts, refs, strict=True)]
    model = ModelConfig(weight_type="FP32")
    with LLM(model, kv_cache_mem_mb=64, int8_kv_cache=True, max_num_batched_tokens=CHUNK_TOKENS) as llm:
        assert all(isinstance(c, Int8KVCache) for c in llm.client.call(lambda engine: engine.runner.caches))
        outs = llm.generate(forced, GenerateConfig(max_new_tokens=0, prompt_logprobs=1))

    agree, diffs = 0, []
    for prompt, ref, out in zip(prompts, refs, outs, strict=True):
        assert len(ref.token_ids) == NEW_TOKENS
        for i, token in enumerate(ref.token_ids):
            entry = out.prompt_logprobs[len(prompt) + i]  # P(. | prompt + the fp32 path's first i tokens)
            agree += max(entry, key=entry.get) == token
            diffs.append(abs(entry[token] - ref.logprobs[i][token]))
    agreement, mean_diff = agree / len(diffs), sum(diffs) / len(diffs)
    assert agreement >= 0.99, f"top-1 agrees at {agree}/{len(diffs)} positions"
    assert mean_diff < 0.05, mean_diff
    assert mean_diff > 1e-4  # the int8 values were really read
