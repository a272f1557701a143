"""mpt: parity with HF MptForCausalLM in the mosaicml/mpt-7b checkpoint layout; unsupported options fail by name."""

from __future__ import annotations

import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from rtp_mm.errors import CheckpointError
from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300


def _release_config(num_heads: int, **attn_overrides) -> dict:
    """config.json shaped like mosaicml/mpt-7b's (remote-code MPTConfig)."""
    attn = {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
        **attn_overrides,
    }
    return {
        "architectures": ["MPTForCausalLM"],
        "attn_config": attn,
        "d_model": 64,
        "emb_pdrop": 0,
        "embedding_fraction": 1.0,
        "expansion_ratio": 4,
        "init_device": "cpu",
        "learned_pos_emb": True,
        "logit_scale": None,
        "max_seq_len": 128,
        "model_type": "mpt",
        "n_heads": num_heads,
        "n_layers": 2,
        "no_bias": True,
        "norm_type": "low_precision_layernorm",
        "resid_pdrop": 0,
        "use_cache": False,
        "vocab_size": VOCAB,
    }


def _mpt(num_heads: int) -> MptForCausalLM:
    torch.manual_seed(61)
    cfg = MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=num_heads, max_seq_len=128)
    return perturb(MptForCausalLM(cfg).eval(), seed=61)


@pytest.mark.parametrize("num_heads", [4, 8])
def test_mpt(tmp_path, num_heads):
    model = _mpt(num_heads)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # mpt-7b stores no head
    path = write_checkpoint(tmp_path / "mpt", tensors, _release_config(num_heads))
    with tiny_llm(path, "mpt") as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=62)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_mpt_unsupported_option_is_named(tmp_path):
    model = _mpt(4)
    path = write_checkpoint(tmp_path / "mpt", model.state_dict(), _release_config(4, clip_qkv=6.0))
    with pytest.raises(CheckpointError, match=r"attn_config\.clip_qkv=6\.0"):
        tiny_llm(path, "mpt")
