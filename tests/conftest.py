"""Shared fixtures. The real default model (SmolLM2-135M GGUF) is loaded once per session: it takes seconds."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_llm():
    from rtp_mm import LLM, ModelConfig

    llm = LLM(ModelConfig(weight_type="FP32"), kv_cache_mem_mb=256)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def default_hf_model():
    """HF transformers' own GGUF loader: dequantizes the same file independently of rtp-mm's reader."""
    import torch
    from transformers import AutoModelForCausalLM

    from rtp_mm.default_model import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()
