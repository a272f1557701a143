"""The text part of the vision MODEL_TYPEs (llava, qwen_vl, chatglm4v), loaded from their real multimodal layouts.

llava: a tiny random transformers ``LlavaForConditionalGeneration`` (Llama LM, CLIP tower) is the oracle; its text-only
generate must match ours whichever way the checkpoint spells the names (what ``save_pretrained`` writes, the
transformers-4 and transformers-5 llava-hf names, the original ``LlavaLlamaForCausalLM`` names). A LLaVA-NeXT with a
Qwen2 LM checks that the LM follows ``text_config.model_type`` (llava-hf) or ``LlavaQwenForCausalLM`` (original).
qwen_vl and chatglm4v: the golden ``text_only`` cases (outputs of the original implementations), and GLM-4's
``rope_ratio`` against transformers' Glm. The images themselves are tested in tests/test_vision.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2Config,
)

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.models.vision_text import llava_build
from rtp_mm.model_types import detect_model_type
from rtp_mm_testing.engine_probe import prompt_positions
from rtp_mm_testing.glm_oracle import chatglm2_config, glm_to_chatglm2_state
from rtp_mm_testing.golden_legacy import check_golden, golden_case
from rtp_mm_testing.oracle import (
    TINY_LLAMA,
    TINY_QWEN2,
    check_parity,
    perturb,
    random_prompts,
    tiny_llm,
    write_checkpoint,
)
from rtp_mm_testing.original_layout import hf_state, randomize_biases
from rtp_mm_testing.shared import GOLDEN, require

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=32,
)
LENGTHS = [6, 17, 3, 25]
LAYOUTS = ["save_pretrained", "transformers4", "transformers5", "original"]


def tiny_llava(seed: int = 3) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=LlamaConfig(**TINY_LLAMA),
        vision_config=CLIPVisionConfig(**TINY_CLIP),
        image_token_index=TINY_LLAMA["vocab_size"] - 1,
    )
    return perturb(LlavaForConditionalGeneration(config).eval(), std=0.02)


def _t4_name(name: str) -> str:
    """transformers-5 state-dict name -> the name llava-hf checkpoints written by transformers 4 carry."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    name = name.removeprefix("model.")
    if name.startswith("language_model."):
        return "language_model.model." + name.removeprefix("language_model.")
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)  # CLIPVisionModel wraps vision_model


def _original_name(name: str) -> str:
    """transformers-5 name -> LlavaLlamaForCausalLM's: the LM at the top under ``model.``, ``model.mm_projector.{0,2}``
    (Linear, GELU, Linear) and the unfrozen CLIP tower under ``model.vision_tower.vision_tower.vision_model.``."""
    name = name.replace("model.language_model.", "model.", 1)
    name = name.replace("multi_modal_projector.linear_1.", "mm_projector.0.").replace(
        "multi_modal_projector.linear_2.", "mm_projector.2."
    )
    return name.replace("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.", 1)


def _llava_15_hf_text_config(text: dict) -> dict:
    """llava-1.5-7b-hf's style: text_config keeps only what differs from LlamaConfig's defaults (no hidden_act,
    head_dim, rope, tie_word_embeddings), so the loader must complete it from the class defaults."""
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    return {"architectures": ["LlamaForCausalLM"], **{k: text[k] for k in keep}}


def save_llava(model: LlavaForConditionalGeneration, path: Path, layout: str, **original_fields) -> Path:
    """``model`` written in ``layout`` (see LAYOUTS); ``original_fields`` override the original layout's config."""
    if layout == "save_pretrained":
        model.save_pretrained(str(path))
        return path
    state, config = hf_state(model), model.config.to_dict()
    if layout == "transformers5":
        return write_checkpoint(path, state, config)
    if layout == "transformers4":
        config["text_config"] = _llava_15_hf_text_config(config["text_config"])
        return write_checkpoint(path, {_t4_name(k): v for k, v in state.items()}, config)
    text = config["text_config"]
    # The CLIP tower's config comes from the folder mm_vision_tower names (its tensors are in the checkpoint).
    clip = path.parent / f"{path.name}-clip"
    CLIPVisionConfig(**config["vision_config"]).save_pretrained(str(clip))
    original = {
        **{k: v for k, v in text.items() if k not in ("model_type", "rope_parameters")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "rope_scaling": None,
        "mm_hidden_size": TINY_CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": str(clip),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
        **original_fields,
    }
    return write_checkpoint(path, {_original_name(k): v for k, v in state.items()}, original)


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    return tiny_llava()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llava_text_parity(tmp_path, llava, layout, caplog):
    path = save_llava(llava, tmp_path / layout, layout)
    config = json.loads((path / "config.json").read_text())
    assert detect_model_type(config) == "llava"
    names = set(load_file(str(path / "model.safetensors")))
    assert any("vision_tower" in n for n in names) and any("projector" in n for n in names)
    # The image token is left out of the prompts: HF would expect pixel values for it.
    prompts = random_prompts(TINY_LLAMA["vocab_size"] - 1, LENGTHS, seed=7)
    with caplog.at_level(logging.DEBUG, logger="rtp_mm.llm.models.vision_text"):
        llm = tiny_llm(path, "llava", max_seq_len=128)
    with llm:
        skipped = [r.getMessage() for r in caplog.records if "vision tensors" in r.getMessage()]
        assert len(skipped) == 1 and "llava: LM skips" in skipped[0], skipped
        check_parity(llm, llava, prompts[:1])
        check_parity(llm, llava, prompts)


@pytest.mark.parametrize("layout", ["save_pretrained", "original"])
def test_llava_next_qwen2_lm(tmp_path, layout):
    """LLaVA-NeXT over a Qwen2 LM (q/k/v biases, image_newline): the Qwen2 family (RTP-LLM's QWenV2 defaults to
    MAX_SEQ_LEN 8192), picked by text_config.model_type (llava-hf) or by LlavaQwenForCausalLM (LLaVA-NeXT's repo)."""
    torch.manual_seed(4)
    config = LlavaNextConfig(
        text_config=Qwen2Config(**TINY_QWEN2),
        vision_config=CLIPVisionConfig(**TINY_CLIP),
        image_token_index=TINY_QWEN2["vocab_size"] - 1,
        image_grid_pinpoints=[[28, 28], [28, 56]],
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    randomize_biases(model.model.language_model)
    original = dict(
        architectures=["LlavaQwenForCausalLM"],
        model_type="llava_qwen",
        image_aspect_ratio="anyres_max_9",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[28, 28], [28, 56]],
    )
    path = save_llava(model, tmp_path, layout, **original)
    assert detect_model_type(json.loads((path / "config.json").read_text())) == "llava"
    assert any(name.endswith("image_newline") for name in load_file(str(path / "model.safetensors")))
    with tiny_llm(path, "llava") as llm:
        assert llm.client.model.spec.qkv_bias and llm.max_seq_len == 8192
        check_parity(llm, model, random_prompts(TINY_QWEN2["vocab_size"] - 1, LENGTHS, seed=8))


def test_llava_hf_text_config_is_completed_with_the_class_defaults():
    """llava-1.5-7b-hf and llava-v1.6-mistral-7b-hf write only the text fields that differ from LlamaConfig /
    MistralConfig defaults; the rest are the released Vicuna-7B / Mistral-7B shapes."""
    vicuna = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    }
    mistral = {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    }
    keys = {"language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight"}
    for arch, text, (inter, kv, theta) in (
        ("LlavaForConditionalGeneration", vicuna, (11008, 32, 10000.0)),
        ("LlavaNextForConditionalGeneration", mistral, (14336, 8, 1e6)),
    ):
        config = {"architectures": [arch], "model_type": "llava", "text_config": text, "vision_config": {}}
        spec = llava_build(config, keys, "llava").spec
        shape = (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads, spec.head_dim, spec.norm_eps)
        assert shape == (32064, 4096, 32, 32, 128, 1e-5), arch
        assert (spec.intermediate_size, spec.num_kv_heads, spec.rope.theta) == (inter, kv, theta), arch
        assert spec.activation == "silu" and not spec.tie_word_embeddings, arch


def test_llava_unknown_text_model_is_a_clear_error(tmp_path, llava):
    path = save_llava(llava, tmp_path / "llava", "transformers5")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_config.model_type='gemma'"):
        tiny_llm(path, "llava")


# ---- golden data of the original implementations ----------------------------------------------------------------


def _text_only(case: str) -> tuple[Path, list[dict], dict[str, torch.Tensor]]:
    ckpt, inputs, expected = golden_case(case)
    return ckpt, [item for item in inputs if item["name"] == "text_only"], expected


def test_golden_qwen_vl_text_only():
    ckpt, inputs, expected = _text_only("qwen_vl")
    with tiny_llm(ckpt, "qwen_vl", max_seq_len=256) as llm:
        check_golden(llm, inputs, expected)


def test_golden_glm4v_text_only():
    ckpt, inputs, expected = _text_only("glm4v")
    with tiny_llm(ckpt, "chatglm4v", max_seq_len=256) as llm:
        (item,) = inputs
        positions = torch.tensor(prompt_positions(llm, item["input_ids"]))
        assert positions.tolist() == expected["position_ids_text_only"].tolist()
        check_golden(llm, inputs, expected)


def test_glm4v_rope_ratio_scales_the_base(tmp_path):
    """GLM-4 follows ChatGLM3: rope_ratio multiplies the rope base (transformers' Glm with rope_theta 10000 * ratio is
    the oracle), here in a GLM-4V checkpoint whose transformer.vision.* tensors come from the golden one."""
    from transformers import GlmConfig, GlmForCausalLM

    ratio = 50.0
    torch.manual_seed(12)
    glm = GlmConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1.5625e-07,
        attention_bias=True,
        rope_parameters={"partial_rotary_factor": 0.5, "rope_type": "default", "rope_theta": 10000.0 * ratio},
        eos_token_id=2,
        pad_token_id=0,
    )
    model = perturb(GlmForCausalLM(glm).eval(), std=0.05)
    golden = require(GOLDEN / "glm4v" / "checkpoint")
    vision = {
        k: v for k, v in load_file(str(golden / "model.safetensors")).items() if k.startswith("transformer.vision.")
    }
    golden_config = json.loads((golden / "config.json").read_text())
    extra = {k: golden_config[k] for k in ("vision_config", "boi_token_id", "eoi_token_id")}
    config = chatglm2_config(glm, 8192, rope_ratio=ratio, **extra)
    write_checkpoint(tmp_path, {**glm_to_chatglm2_state(model), **vision}, config)
    assert detect_model_type(config) == "chatglm4v"
    with tiny_llm(tmp_path, "chatglm4v", max_seq_len=256) as llm:
        check_parity(llm, model, random_prompts(320, LENGTHS, seed=9))
