"""Tiny random checkpoints for ``rtp-mm bench --vision``, in each vision family's real on-disk layout, and a prompt
holding one image for each (ids as the family's tokenizer would produce them, special ids moved into a 512-id
vocabulary through the config fields the originals read, as the golden tiny checkpoints do).

The shape tables follow the original modelling code (Qwen-VL's ``QWenLMHeadModel`` and GLM-4V's
``ChatGLMForConditionalGeneration``); a test checks them against the golden checkpoints' names and shapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BenchCase:
    """How to bench one family: a tiny random checkpoint in its real layout, and a prompt holding one image."""

    model_type: str
    build: Callable[[Path], None]  # writes config.json + weights into the folder
    prompt: Callable[[dict[str, Any], int], list[int]]  # (config.json, request index) -> prompt ids


def _init(shape: tuple[int, ...], g: torch.Generator, name: str) -> torch.Tensor:
    """LayerNorm weights near 1, everything else small noise (random biases keep layout bugs visible)."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) > 1 and ("norm" in parts[-2] or parts[-2].startswith("ln_")):
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _write(path: Path, shapes: dict[str, tuple[int, ...]], config: dict[str, Any], seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {name: _init(shape, g, name) for name, shape in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ---- qwen_vl: Qwen v1 + ViT + 256-query resampler, names as QWenLMHeadModel saves them -------------------------
QWEN_VL_CONFIG: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "hidden_size": 128,
    "intermediate_size": 256,
    "kv_channels": 32,
    "layer_norm_epsilon": 1e-6,
    "max_position_embeddings": 8192,
    "no_bias": True,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "visual": {
        "heads": 4,
        "image_size": 448,
        "image_start_id": 481,  # <img>; </img> = +1, <imgpad> = +2 (moved into the small vocabulary)
        "layers": 2,
        "mlp_ratio": 4.9231,
        "output_dim": 128,
        "patch_size": 14,
        "width": 64,
    },
    "vocab_size": 512,
}


def qwen_vl_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, inner, vocab = config["hidden_size"], config["intermediate_size"] // 2, config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "transformer.ln_f.weight": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (h,),
            p + "ln_2.weight": (h,),
            p + "attn.c_attn.weight": (3 * h, h),
            p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h),
            p + "mlp.w1.weight": (inner, h),
            p + "mlp.w2.weight": (inner, h),
            p + "mlp.c_proj.weight": (h, inner),
        }
    v = config["visual"]
    w, out, patch, mlp = v["width"], v["output_dim"], v["patch_size"], int(v["width"] * v["mlp_ratio"])
    p = "transformer.visual."
    shapes |= {
        p + "conv1.weight": (w, 3, patch, patch),
        p + "positional_embedding": (256, w),  # a 16x16 grid, resized bicubically to the image's grid
        p + "ln_pre.weight": (w,),
        p + "ln_pre.bias": (w,),
        p + "ln_post.weight": (out,),
        p + "ln_post.bias": (out,),
        p + "proj": (out, out),
        p + "attn_pool.query": (256, out),
        p + "attn_pool.pos_embed": (256, out),
        p + "attn_pool.kv_proj.weight": (out, w),
        p + "attn_pool.attn.in_proj_weight": (3 * out, out),
        p + "attn_pool.attn.in_proj_bias": (3 * out,),
        p + "attn_pool.attn.out_proj.weight": (out, out),
        p + "attn_pool.attn.out_proj.bias": (out,),
        p + "attn_pool.ln_q.weight": (out,),
        p + "attn_pool.ln_q.bias": (out,),
        p + "attn_pool.ln_kv.weight": (out,),
        p + "attn_pool.ln_kv.bias": (out,),
    }
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        shapes |= {
            b + "ln_1.weight": (w,),
            b + "ln_1.bias": (w,),
            b + "ln_2.weight": (w,),
            b + "ln_2.bias": (w,),
            b + "attn.in_proj.weight": (3 * w, w),
            b + "attn.in_proj.bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w),
            b + "attn.out_proj.bias": (w,),
            b + "mlp.c_fc.weight": (mlp, w),
            b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (w, mlp),
            b + "mlp.c_proj.bias": (w,),
        }
    return shapes


def _build_qwen_vl(path: Path) -> None:
    _write(path, qwen_vl_shapes(QWEN_VL_CONFIG), QWEN_VL_CONFIG)


def _qwen_vl_prompt(config: dict[str, Any], index: int) -> list[int]:
    """``Picture 1: <img>name</img>`` as ids: the name's UTF-8 bytes, ``<imgpad>`` up to 256 ids between the tags."""
    start = config["visual"]["image_start_id"]
    name = list(f"img{index}.png".encode())
    return [473, 30, 40, 50, start, *name, *[start + 2] * (256 - len(name)), start + 1, 60, 70, 474]


# ---- chatglm4v: GLM-4 + EVA2-CLIP + 2x2 conv + GLU projector, names as ChatGLMForConditionalGeneration saves them
GLM4V_CONFIG: dict[str, Any] = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "vision_config": {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "in_channels": 3,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "patch_size": 14,
        "num_heads": 4,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-6,
        "num_positions": (448 // 14) ** 2 + 1,
        "image_size": 448,
        "scaling_factor": 8,
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "ffn_hidden_size": 160,
    "hidden_size": 64,
    "kv_channels": 16,
    "layernorm_epsilon": 1.5625e-07,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 4,
    "num_layers": 2,
    "original_rope": True,
    "padded_vocab_size": 512,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    # GLM-4's special ids moved into the small vocabulary: <|endoftext|> 488, [gMASK] 490, <sop> 492, <|user|> 495,
    # <|assistant|> 496, <|observation|> 497, <|begin_of_image|> 498, <|end_of_image|> 499.
    "eos_token_id": [488, 495, 497],
    "pad_token_id": 488,
    "boi_token_id": 498,
    "eoi_token_id": 499,
}


def glm4v_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    kv, groups, heads = config["kv_channels"], config["multi_query_group_num"], config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, h),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (vocab, h),
        "transformer.rotary_pos_emb.inv_freq": (kv // 4,),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": (heads * kv + 2 * groups * kv, h),
            p + "self_attention.query_key_value.bias": (heads * kv + 2 * groups * kv,),
            p + "self_attention.dense.weight": (h, heads * kv),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, h),
            p + "mlp.dense_4h_to_h.weight": (h, ffn),
        }
    v = config["vision_config"]
    vh, vi, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    p = "transformer.vision."
    shapes |= {
        p + "patch_embedding.proj.weight": (vh, v["in_channels"], patch, patch),
        p + "patch_embedding.proj.bias": (vh,),
        p + "patch_embedding.cls_embedding": (1, vh),
        p + "patch_embedding.position_embedding.weight": (v["num_positions"], vh),
        p + "conv.weight": (h, vh, 2, 2),
        p + "conv.bias": (h,),
        p + "linear_proj.linear_proj.weight": (h, h),
        p + "linear_proj.norm1.weight": (h,),
        p + "linear_proj.norm1.bias": (h,),
        p + "linear_proj.dense_h_to_4h.weight": (ffn, h),
        p + "linear_proj.gate_proj.weight": (ffn, h),
        p + "linear_proj.dense_4h_to_h.weight": (h, ffn),
        p + "boi": (1, 1, h),
        p + "eoi": (1, 1, h),
    }
    for i in range(v["num_hidden_layers"]):
        b = f"{p}transformer.layers.{i}."
        shapes |= {
            b + "input_layernorm.weight": (vh,),
            b + "input_layernorm.bias": (vh,),
            b + "post_attention_layernorm.weight": (vh,),
            b + "post_attention_layernorm.bias": (vh,),
            b + "attention.query_key_value.weight": (3 * vh, vh),
            b + "attention.query_key_value.bias": (3 * vh,),
            b + "attention.dense.weight": (vh, vh),
            b + "attention.dense.bias": (vh,),
            b + "mlp.fc1.weight": (vi, vh),
            b + "mlp.fc1.bias": (vi,),
            b + "mlp.fc2.weight": (vh, vi),
            b + "mlp.fc2.bias": (vh,),
        }
    return shapes


def _build_glm4v(path: Path) -> None:
    _write(path, glm4v_shapes(GLM4V_CONFIG), GLM4V_CONFIG)
    # The rotary buffer the original saves: 1 / 10000^(2i/d) over half of each head.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    dim = GLM4V_CONFIG["kv_channels"] // 2
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    save_file(tensors, str(path / "model.safetensors"))


def _glm4v_prompt(config: dict[str, Any], index: int) -> list[int]:
    """``[gMASK]<sop><|user|>`` + boi, <|endoftext|>, eoi + text + ``<|assistant|>``."""
    return [490, 492, 495, 20 + index, config["boi_token_id"], 488, config["eoi_token_id"], 30, 40, 50, 496]


# ---- llava: llava-hf LlavaForConditionalGeneration (CLIP-L/336-shaped grid: 576 rows per image) -------------------
def _build_llava(path: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=336, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=511, projector_hidden_act="gelu")
    LlavaForConditionalGeneration(config).eval().save_pretrained(str(path))


def _llava_prompt(config: dict[str, Any], index: int) -> list[int]:
    image = config.get("image_token_index", config.get("image_token_id"))
    return [1, 20 + index, 30, image, 40, 50, 60]


CASES: dict[str, BenchCase] = {
    "llava": BenchCase("llava", _build_llava, _llava_prompt),
    "qwen_vl": BenchCase("qwen_vl", _build_qwen_vl, _qwen_vl_prompt),
    "chatglm4v": BenchCase("chatglm4v", _build_glm4v, _glm4v_prompt),
}
