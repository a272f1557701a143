"""Oracles for the GLM families: an independent plain-torch GLM v1 / GLM-130B forward written from the family
description (legacy-families.md §2.1 and §2.4), checked against the ChatGLM-6B golden data before it is trusted for
GLM-130B, and writers of ORIGINAL-layout checkpoints (ChatGLM2/3 from a transformers GlmForCausalLM, GLM-130B)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rtp_mm_testing.shared import GOLDEN  # noqa: F401  (re-exported for the GLM tests)


def read_bin_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def glm_v1_reference_logits(
    state: dict[str, torch.Tensor],
    ids: list[int],
    *,
    heads: int,
    sop: int,
    mask_priority: tuple[int, ...],
    gmask: int,
    two_d: bool,
    geglu: bool,
    alpha: float,
    eps: float = 1e-5,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """[T, vocab] logits of one full-sequence forward (no cache) of a GLM v1-skeleton model in fp32.

    Built from the description only: [T, H, 3, D] per-head fused qkv, rotate-half rotary with fp16-rounded
    frequencies (2D: head halves by position and block position), keys before <sop> visible to every query
    (masked scores filled with -10000), DeepNorm residual, LayerNorm, tanh-GELU MLP or GeGLU x1 * gelu(x2), output
    tied to the word embeddings. ``prefix`` (P-tuning v2) gives each layer's past (K, V) [P, H, D], used as stored
    (never rotated) and visible to every query, as ChatGLM-6B's ``past_key_values``.
    """
    w = {k: v.float() for k, v in state.items()}
    emb = w["transformer.word_embeddings.weight"]
    hidden = emb.shape[1]
    d = hidden // heads
    n = len(ids)
    c = ids.index(sop)
    mask_id = next(m for m in mask_priority if m in ids[:c])
    m = ids.index(mask_id)
    t = torch.arange(n)
    after = t >= c
    if two_d:
        pos = torch.where(after, m, t)
        block = torch.where(after, t - c + 1, 0)
    else:
        pos = t if mask_id == gmask else torch.where(after, m, t)
    rot_dim = d // 2 if two_d else d
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)).half().float()

    def rotate(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # x [T, H, rot_dim]
        angles = p[:, None].float() * inv_freq
        cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    visible = (t[None, :] <= t[:, None]) | (t[None, :] < c)
    x = emb[torch.tensor(ids)]
    num_layers = len({k.split(".")[2] for k in w if k.startswith("transformer.layers.")})
    for i in range(num_layers):
        p = f"transformer.layers.{i}."

        def norm(z: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
            return F.layer_norm(z, (hidden,), w[p + name + ".weight"], w[p + name + ".bias"], eps)

        def linear(z: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
            return F.linear(z, w[p + name + ".weight"], w[p + name + ".bias"])

        h = norm(x, "input_layernorm")
        q, k, v = linear(h, "attention.query_key_value").view(n, heads, 3, d).unbind(2)
        if two_d:
            half = d // 2
            q = torch.cat((rotate(q[..., :half], pos), rotate(q[..., half:], block)), -1)
            k = torch.cat((rotate(k[..., :half], pos), rotate(k[..., half:], block)), -1)
        else:
            q, k = rotate(q, pos), rotate(k, pos)
        keys_visible = visible
        if prefix is not None:
            k, v = torch.cat((prefix[i][0].float(), k)), torch.cat((prefix[i][1].float(), v))
            keys_visible = torch.cat((torch.ones(n, prefix[i][0].shape[0], dtype=torch.bool), visible), dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~keys_visible, -10000.0).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, hidden)
        x = h * alpha + linear(attn, "attention.dense")
        h = norm(x, "post_attention_layernorm")
        up = linear(h, "mlp.dense_h_to_4h")
        if geglu:
            x1, x2 = up.chunk(2, -1)
            up = x1 * F.gelu(x2)
        else:
            up = F.gelu(up, approximate="tanh")
        x = h * alpha + linear(up, "mlp.dense_4h_to_h")
    x = F.layer_norm(x, (hidden,), w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], eps)
    return x @ emb.T


def reference_greedy(logits_fn, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full recomputation; returns the tokens and [steps, vocab] log-softmax of each step."""
    ids, rows = list(prompt), []
    for _ in range(steps):
        row = logits_fn(ids)[-1]
        rows.append(torch.log_softmax(row, -1))
        ids.append(int(row.argmax()))
    return ids[len(prompt) :], torch.stack(rows)


# ---- ChatGLM2/3 written from a transformers GlmForCausalLM ----------------------------------------------------


def chatglm2_config(hf_config, seq_length: int, **extra) -> dict:
    """config.json as the THUDM chatglm2-6b / chatglm3-6b releases write it, with the tiny model's sizes."""
    return {
        "_name_or_path": "THUDM/chatglm2-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": hf_config.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hf_config.hidden_size,
        "kv_channels": hf_config.head_dim,
        "layernorm_epsilon": hf_config.rms_norm_eps,
        "multi_query_attention": True,
        "multi_query_group_num": hf_config.num_key_value_heads,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_layers": hf_config.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": hf_config.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": seq_length,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **extra,
    }


def glm_to_chatglm2_state(model) -> dict[str, torch.Tensor]:
    """A GlmForCausalLM's weights under ChatGLM2's original names (fused [Q | K | V], fused [gate; up])."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    rot = cfg.head_dim // 2  # the original's rotary module is built with kv_channels // 2 dims
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        for p in ("weight", "bias"):
            out[dst + f"self_attention.query_key_value.{p}"] = torch.cat([sd[attn + f"{x}_proj.{p}"] for x in "qkv"])
        out[dst + "self_attention.dense.weight"] = sd[attn + "o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    return out


def save_sharded(state: dict[str, torch.Tensor], folder: Path, fmt: str, shards: int = 2) -> None:
    """Sharded weights plus index, named as the THUDM releases (``pytorch_model-0000k-of-0000n.bin`` or
    ``model-0000k-of-0000n.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    stem, suffix = ("pytorch_model", ".bin") if fmt == "bin" else ("model", ".safetensors")
    weight_map = {}
    for k in range(shards):
        file = f"{stem}-{k + 1:05d}-of-{shards:05d}{suffix}"
        part = {n: state[n].contiguous() for n in names[k::shards]}
        if fmt == "bin":
            torch.save(part, folder / file)
        else:
            save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (folder / f"{stem}{suffix}.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


def tiny_glm(seed: int = 5, rope_parameters: dict | None = None, vocab_size: int = 320):
    """A tiny random transformers GlmForCausalLM (ChatGLM2/3's architecture: partial rotary, GQA, q/k/v biases) with
    non-trivial biases and norms (random init leaves them at 0 and 1)."""
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(seed)
    cfg = GlmConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        attention_bias=True,
        rope_parameters={
            "partial_rotary_factor": 0.5,
            "rope_type": "default",
            "rope_theta": 10000.0,
            **(rope_parameters or {}),
        },
        eos_token_id=2,
        pad_token_id=0,
    )
    model = GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.2)
    return model
