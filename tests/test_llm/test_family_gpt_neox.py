"""gpt_neox: parity with HF GPTNeoXForCausalLM in the released Pythia checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300


@pytest.mark.parametrize("rotary_pct,parallel", [(0.25, True), (0.5, False)])
def test_gpt_neox(tmp_path, rotary_pct, parallel):
    torch.manual_seed(41)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_pct},
        use_parallel_residual=parallel,
        tie_word_embeddings=False,
    )
    model = perturb(GPTNeoXForCausalLM(cfg).eval(), seed=41)
    # Pythia's files (transformers 4.24): the head is embed_out, and each layer also stores its mask buffers and
    # rotary frequencies, which loading must skip.
    tensors = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    rot = int(16 * rotary_pct)
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        tensors[p + "bias"] = torch.tril(torch.ones(256, 256, dtype=torch.bool))[None, None]
        tensors[p + "masked_bias"] = torch.tensor(-1e9)
        tensors[p + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    release = {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "model_type": "gpt_neox",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rotary_emb_base": 10000,
        "rotary_pct": rotary_pct,
        "tie_word_embeddings": False,
        "use_parallel_residual": parallel,
        "vocab_size": VOCAB,
    }
    path = write_checkpoint(tmp_path / "neox", tensors, release)
    with tiny_llm(path, "gpt_neox") as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=42)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)
