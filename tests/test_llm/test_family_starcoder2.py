"""starcoder2: parity with HF Starcoder2ForCausalLM in the bigcode/starcoder2 checkpoint layout."""

from __future__ import annotations

import torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM

from rtp_mm_testing.oracle import check_parity, perturb, random_prompts, tiny_llm, write_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
VOCAB = 300


def test_starcoder2(tmp_path):
    torch.manual_seed(31)
    cfg = Starcoder2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813},
        sliding_window=None,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = perturb(Starcoder2ForCausalLM(cfg).eval(), seed=31)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    release = {  # as bigcode/starcoder2-3b ships it (transformers 4.37 names)
        "architectures": ["Starcoder2ForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 64,
        "intermediate_size": 96,
        "max_position_embeddings": 256,
        "mlp_type": "default",
        "model_type": "starcoder2",
        "norm_epsilon": 1e-5,
        "norm_type": "layer_norm",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rope_theta": 999999.4420358813,
        "sliding_window": 4096,
        "use_bias": True,
        "vocab_size": VOCAB,
    }
    path = write_checkpoint(tmp_path / "starcoder2", tensors, release)
    with tiny_llm(path, "starcoder2") as llm:
        prompts = random_prompts(VOCAB, LENGTHS, seed=32)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)
