"""Checkpoints for the tensor-parallel tests: one per sharding case (GQA, q/k/v biases with an untied head, 2 kv
groups through a fused query_key_value, ALiBi with per-head interleaved qkv, multi-query with a replicated kv head)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

from rtp_mm_testing.oracle import perturb, save_hf, tiny_llama, tiny_qwen2, write_checkpoint
from rtp_mm_testing.shared import GOLDEN


def _bloom(path: Path) -> Path:  # ALiBi, 4 heads: each rank takes its two heads' slopes
    torch.manual_seed(11)
    model = perturb(BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4)).eval(), seed=11)
    return save_hf(model, path)


def _falcon(path: Path) -> Path:  # multi-query: the one kv head is replicated on both ranks
    torch.manual_seed(51)
    cfg = FalconConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
    )
    model = perturb(FalconForCausalLM(cfg).eval(), seed=51)
    return write_checkpoint(path, dict(model.state_dict()), {**cfg.to_dict(), "architectures": ["FalconForCausalLM"]})


def _chatglm2(path: Path) -> Path:  # the golden checkpoint (read-only): a copy, so a tokenizer can be added beside it
    import shutil

    shutil.copytree(GOLDEN / "chatglm2" / "checkpoint", path)
    return path


CASES = {
    # name: (checkpoint builder, MODEL_TYPE, vocabulary)
    "llama_gqa": (lambda p: save_hf(tiny_llama(), p), "llama", 320),
    "qwen_2_bias_untied_head": (lambda p: save_hf(tiny_qwen2(), p), "qwen_2", 300),
    "chatglm2_two_kv_groups": (_chatglm2, "chatglm2", 512),
    "bloom_alibi": (_bloom, "bloom", 300),
    "falcon_mqa": (_falcon, "falcon", 300),
}
