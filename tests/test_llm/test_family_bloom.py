"""bloom / sgpt_bloom: parity with HF BloomForCausalLM for checkpoints in the real BLOOM layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300


def _bloom() -> BloomForCausalLM:
    torch.manual_seed(11)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=True)
    return perturb(BloomForCausalLM(cfg).eval(), seed=11)


def _release_config(model: BloomForCausalLM, architecture: str) -> dict:
    """config.json as bigscience/bloom-560m ships it (n_head / n_layer names, seq_length absent)."""
    c = model.config
    return {
        "apply_residual_connection_post_layernorm": False,
        "architectures": [architecture],
        "attention_softmax_in_fp32": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": c.hidden_size,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "model_type": "bloom",
        "n_head": c.n_head,
        "n_inner": None,
        "n_layer": c.n_layer,
        "offset_alibi": 100,
        "pad_token_id": 3,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "unk_token_id": 0,
        "vocab_size": c.vocab_size,
    }


@pytest.mark.parametrize("model_type", ["bloom", "sgpt_bloom"])
def test_bloom_release_layout(tmp_path, model_type):
    """bloom-560m layout: BloomModel keys without prefix and no lm_head (the head is the word embedding)."""
    model = _bloom()
    tensors = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path = write_checkpoint(tmp_path / "bloom", tensors, _release_config(model, "BloomForCausalLM"))
    with tiny_llm(path, model_type) as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=5)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_bloom_causal_lm_layout_non_power_of_two_heads(tmp_path):
    """BloomForCausalLM keys (``transformer.`` prefix, lm_head stored) and 6 heads: ALiBi's interleaved slopes."""
    torch.manual_seed(12)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=72, n_layer=2, n_head=6)
    model = perturb(BloomForCausalLM(cfg).eval(), seed=12)
    path = write_checkpoint(tmp_path / "bloom6", model.state_dict(), _release_config(model, "BloomForCausalLM"))
    with tiny_llm(path, "bloom") as llm:
        check_parity(llm, model, random_prompts(VOCAB, LENGTHS, seed=6))
