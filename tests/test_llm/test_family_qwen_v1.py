"""Qwen v1 (qwen_7b / qwen_13b / qwen_1b8): the golden checkpoint of the original implementation, and a tiny random
HF Qwen2 written in Qwen v1's own layout (fused c_attn, gate w2, halved intermediate_size).

Beyond ``seq_length`` the original scales queries by logn and picks a dynamic-NTK alpha once, from the prompt length,
keeping it while decoding. Within one alpha, that model is a Qwen2 whose rope base is ``base * alpha^(d/(d-2))`` and
whose queries are scaled per position (logn commutes with the rotation), which gives an independent oracle for
decodes that cross ``seq_length`` or an alpha bucket.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rtp_mm import GenerateConfig
from rtp_mm.errors import CheckpointError
from rtp_mm_testing.golden_legacy import check_golden, golden_case
from rtp_mm_testing.oracle import TINY_QWEN2, check_parity, random_prompts, tiny_llama, tiny_llm, tiny_qwen2
from rtp_mm_testing.original_layout import hf_state, save_checkpoint

LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]
HEADS = 4


def qwen_v1_checkpoint(path, model: Qwen2ForCausalLM, seq_length: int, tie: bool = False):
    """The HF Qwen2 weights under Qwen v1 names, config.json as the released Qwen-7B (sizes changed)."""
    cfg = model.config
    sd = hf_state(model)
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
    }
    if not tie:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]  # Qwen v1's gate is w2
        out[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 2 * cfg.intermediate_size,  # both SwiGLU branches, as released
        "initializer_range": 0.02,
        "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        "layer_norm_epsilon": cfg.rms_norm_eps,
        "max_position_embeddings": 32768,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "onnx_safe": None,
        "rotary_emb_base": cfg.rope_parameters["rope_theta"],
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "tie_word_embeddings": tie,
        "tokenizer_class": "QWenTokenizer",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": cfg.vocab_size,
    }
    return save_checkpoint(path, out, config, {"chat_format": "chatml", "eos_token_id": 151643 % cfg.vocab_size})


def test_golden_qwen_7b():
    ckpt, inputs, expected = golden_case("qwen_7b")
    with tiny_llm(ckpt, "qwen_7b", max_seq_len=256) as llm:
        check_golden(llm, inputs, expected)


def test_golden_qwen_7b_chunked_prefill_and_preemption():
    """NTK alpha must come from the whole prompt even when the prompt is prefilled in chunks or recomputed."""
    ckpt, inputs, expected = golden_case("qwen_7b")
    prompts = [item["input_ids"] for item in inputs]
    cfg = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True)
    for kw in ({"max_num_batched_tokens": 20}, {"kv_cache_blocks": 24, "max_seq_len": 192}):
        with tiny_llm(ckpt, "qwen_7b", **kw) as llm:
            outs = llm.generate(prompts, cfg)
            for item, out in zip(inputs, outs, strict=True):
                assert out.token_ids == expected[f"greedy_{item['name']}"].tolist(), (kw, item["name"])
            if "kv_cache_blocks" in kw:
                assert llm.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("model_type", ["qwen_7b", "qwen_13b", "qwen_1b8"])
def test_qwen_v1_layout_matches_qwen2_within_seq_length(tmp_path, model_type):
    model = tiny_qwen2(num_key_value_heads=HEADS)  # Qwen v1 is plain multi-head attention
    path = qwen_v1_checkpoint(tmp_path / "qwen", model, seq_length=2048)
    with tiny_llm(path, model_type) as llm:
        prompts = random_prompts(TINY_QWEN2["vocab_size"], LENGTHS, seed=5)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_qwen_v1_tied_head(tmp_path):
    model = tiny_qwen2(num_key_value_heads=HEADS, tie_word_embeddings=True)
    path = qwen_v1_checkpoint(tmp_path / "qwen", model, seq_length=2048, tie=True)
    with tiny_llm(path, "qwen_7b") as llm:
        check_parity(llm, model, random_prompts(TINY_QWEN2["vocab_size"], [7, 19], seed=6))


def _ntk_alpha(prompt_len: int, seq_length: int) -> int:
    return max(2 ** math.ceil(math.log2(prompt_len / seq_length) + 1) - 1, 1)


def _logn_qwen2(state: dict, theta: float, seq_length: int) -> Qwen2ForCausalLM:
    """Qwen2 with rope base ``theta`` and queries scaled by log_{seq_length}(p + 1) beyond seq_length (no KV cache:
    every call is a full forward, so row p is position p)."""
    cfg = {**TINY_QWEN2, "num_key_value_heads": HEADS}
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta})).eval()
    model.load_state_dict(state)

    def scale(_module, _inputs, out):
        pos1 = torch.arange(1, out.shape[1] + 1, dtype=torch.float64)
        logn = torch.where(pos1 > seq_length, pos1.log() / math.log(seq_length), 1.0).to(out.dtype)
        return out * logn[None, :, None]

    for layer in model.model.layers:
        layer.self_attn.q_proj.register_forward_hook(scale)
    return model


@torch.no_grad()
def _recompute_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    ids, rows = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        rows.append(torch.log_softmax(logits, -1))
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], torch.stack(rows)


def test_qwen_v1_ntk_and_logn_while_decoding(tmp_path):
    """seq_length 16: a prompt inside it decodes past it (logn on, alpha stays 1); a 20-token prompt gets alpha 3
    and keeps it while decoding across 32, where a recomputation would pick alpha 7. Batched together."""
    seq_length, steps = 16, 24
    model = tiny_qwen2(num_key_value_heads=HEADS)
    path = qwen_v1_checkpoint(tmp_path / "qwen", model, seq_length=seq_length)
    prompts = random_prompts(TINY_QWEN2["vocab_size"], [12, 20, 35], seed=8)
    cfg = GenerateConfig(max_new_tokens=steps, top_k=1, logprobs=5, ignore_eos=True)
    with tiny_llm(path, "qwen_7b") as llm:
        outs = llm.generate(prompts, cfg)
    state, head_dim = model.state_dict(), TINY_QWEN2["hidden_size"] // HEADS
    for prompt, out in zip(prompts, outs, strict=True):
        alpha = _ntk_alpha(len(prompt), seq_length)
        theta = 10000.0 * alpha ** (head_dim / (head_dim - 2))
        tokens, ref = _recompute_greedy(_logn_qwen2(state, theta, seq_length), prompt, steps)
        assert out.token_ids == tokens, (len(prompt), alpha)
        for step, entry in enumerate(out.logprobs):
            for token, lp in entry.items():
                assert abs(lp - float(ref[step, token])) < 1e-3, (len(prompt), step, token)


def test_qwen_v1_config_with_other_weight_names_is_a_clear_error(tmp_path):
    path = tmp_path / "llama"
    tiny_llama(path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["QWenLMHeadModel"], model_type="qwen")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="c_attn"):
        tiny_llm(path, "qwen_7b")
