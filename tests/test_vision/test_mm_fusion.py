"""Image rows fused into the shared engine: parity with HF transformers run on the same spliced ``inputs_embeds``
(one chunk and chunked prefill that splits an image span), ``input_len`` counting expanded tokens, per-request
length errors, and prefix-cache keys that include the image content hash.

The vision model is the test-only ``fake_vision`` (a fixed random linear encoder): what is under test is the
plumbing around any encoder. Oracle: HF ``LlamaForCausalLM`` on embeddings the test splices itself.
"""

from __future__ import annotations

import pytest
import torch

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import InvalidRequest, PromptTooLongError
from rtp_mm_testing.fake_vision import (
    MODEL_TYPE,
    ROWS,
    FakeVisionModel,
    hf_greedy_embeds,
    hf_inputs_embeds,
    make_checkpoint,
    picture,
    registered,
)
from rtp_mm_testing.oracle import tiny_llm

NEW = 12
CFG = GenerateConfig(max_new_tokens=NEW, top_k=1, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with registered():
        path = tmp_path_factory.mktemp("fake_vision_fusion")
        model, image_id = make_checkpoint(path)
        yield path, model, image_id


def _oracle_prepared(path_model_id, ids: list[int], images: list) -> tuple:
    """Expanded prompt built by a fresh fake model (not the runner under test)."""
    _, model, image_id = path_model_id
    fake = FakeVisionModel(image_id, model.config.hidden_size)
    embeds = fake.encode([fake.preprocess(im) for im in images])
    return fake.expand(ids, embeds, [str(i) for i in range(len(images))])


@torch.no_grad()
def _hf_logprobs(model, embeds: torch.Tensor, generated: list[int]) -> torch.Tensor:
    """log_softmax at every generated position, from one full forward over prompt + generated tokens."""
    gen = model.get_input_embeddings()(torch.tensor([generated[:-1]]))
    logits = model(inputs_embeds=torch.cat([embeds, gen], dim=1)).logits[0, embeds.shape[1] - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("budget", [512, 5])
def test_greedy_and_logprobs_match_hf_on_spliced_embeds(ckpt, budget):
    """budget=5 prefills in chunks of 5 tokens, so both 6-row image spans are split across steps."""
    path, model, image_id = ckpt
    with registered():
        llm = tiny_llm(path, MODEL_TYPE, max_num_batched_tokens=budget)
    try:
        ids = [1, 17, 40, image_id, 55, 61, 7, image_id, 99, 12]
        images = [picture(1), picture(2, 40, 12)]
        steps_before = llm.stats()["step_count"]
        out = llm.generate([ids], CFG, images=[images])[0]
        prepared = _oracle_prepared(ckpt, ids, images)
        embeds = hf_inputs_embeds(model, prepared)
        assert out.token_ids == hf_greedy_embeds(model, embeds, NEW)
        ref = _hf_logprobs(model, embeds, out.token_ids)
        for step, entry in enumerate(out.logprobs):
            for token, lp in entry.items():
                assert abs(lp - float(ref[step, token])) < 1e-3, (step, token)
        expanded = len(ids) - 2 + 2 * ROWS
        prefill_steps = llm.stats()["step_count"] - steps_before - (NEW - 1)
        assert prefill_steps == -(-expanded // budget)  # the chunked run really split the prompt
        assert out.aux_info["input_len"] == expanded == len(prepared.token_ids)
    finally:
        llm.shutdown()


def test_expanded_prompt_over_max_seq_len_is_a_per_request_error(ckpt):
    path, _, image_id = ckpt
    with registered():
        llm = tiny_llm(path, MODEL_TYPE, max_seq_len=32)
    try:
        ids = [1] + [5] * 14 + [image_id] * 3  # 18 tokens as text; 15 + 3 * 6 = 33 once expanded
        with pytest.raises(PromptTooLongError, match="prompt length 33 >= max_seq_len 32"):
            llm.generate([ids], CFG, images=[[picture(1), picture(2), picture(3)]])
        with pytest.raises(InvalidRequest, match=r"tags \(1\) and multimodal input \(2\) not matched"):
            llm.generate([[1, 5, image_id]], CFG, images=[[picture(1), picture(2)]])
        ok = llm.generate([[1, 5, image_id, 9]], GenerateConfig(max_new_tokens=2, top_k=1), images=[[picture(1)]])
        assert ok[0].aux_info["input_len"] == 3 + ROWS
    finally:
        llm.shutdown()


def test_prefix_cache_keys_include_the_image(ckpt):
    """Blocks of 4: 8 text tokens, a 6-row image at offset 8, 10 text tokens (24 expanded). A different image may
    reuse only the 2 text blocks before it; the same image reuses 5 blocks and gives identical output."""
    path, _, image_id = ckpt
    with registered():
        llm = LLM(
            ModelConfig(model_type=MODEL_TYPE, ckpt_path=str(path), weight_type="FP32", seq_size_per_block=4),
            kv_cache_mem_mb=16,
            skip_tokenizer_init=True,
            reuse_cache=True,
        )
    try:
        ids = [1, 20, 21, 22, 23, 24, 25, 26, image_id, *range(30, 40)]
        first = llm.generate([ids], CFG, images=[[picture(1)]])[0]
        other = llm.generate([ids], CFG, images=[[picture(2)]])[0]
        again = llm.generate([ids], CFG, images=[[picture(1)]])[0]
        assert first.aux_info["reuse_len"] == 0
        assert other.aux_info["reuse_len"] == 8  # text blocks only: no block the image touches
        assert again.aux_info["reuse_len"] == 20  # (24 - 1) // 4 full blocks, image blocks included
        assert again.token_ids == first.token_ids
        assert other.token_ids != first.token_ids  # the image matters, so a wrongly shared block would show
        for a, b in zip(first.logprobs, again.logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    finally:
        llm.shutdown()
