"""gpt_bigcode / wizardcoder: parity with HF GPTBigCodeForCausalLM in the StarCoder checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300


def _release_config(c: GPTBigCodeConfig, tie: bool) -> dict:
    """config.json shaped like bigcode/starcoder's (n_* names, multi_query flag, gelu_pytorch_tanh)."""
    return {
        "activation_function": "gelu_pytorch_tanh",
        "architectures": ["GPTBigCodeForCausalLM"],
        "attention_softmax_in_fp32": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "layer_norm_epsilon": 1e-5,
        "model_type": "gpt_bigcode",
        "multi_query": c.multi_query,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "n_layer": c.n_layer,
        "n_positions": c.n_positions,
        "scale_attention_softmax_in_fp32": True,
        "scale_attn_weights": True,
        "tie_word_embeddings": tie,
        "vocab_size": c.vocab_size,
    }


@pytest.mark.parametrize(
    "model_type,multi_query,tie",
    [("gpt_bigcode", True, True), ("wizardcoder", True, False), ("gpt_bigcode", False, False)],
)
def test_gpt_bigcode(tmp_path, model_type, multi_query, tie):
    torch.manual_seed(21)
    cfg = GPTBigCodeConfig(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=96,
        n_positions=128,
        multi_query=multi_query,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = perturb(GPTBigCodeForCausalLM(cfg).eval(), seed=21)
    tensors = dict(model.state_dict())
    tensors.pop("transformer.bias", None)  # a registered buffer, not a weight
    if tie:
        del tensors["lm_head.weight"]
    path = write_checkpoint(tmp_path / "bigcode", tensors, _release_config(cfg, tie))
    with tiny_llm(path, model_type) as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=22)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)
