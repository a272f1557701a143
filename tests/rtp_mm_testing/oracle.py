"""Independent oracles for parity tests: HF transformers reference models (tiny random configs built here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rtp_mm import LLM, GenerateConfig, ModelConfig


def save_hf(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


TINY_LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

TINY_QWEN2 = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_llama(path: Path | None = None, seed: int = 1, **overrides):
    """A tiny random HF LlamaForCausalLM (GQA by default), saved to ``path`` when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
    if path is not None:
        save_hf(model, path)
    return model


TINY_GPT_NEOX = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_gpt_neox(path: Path | None = None, seed: int = 3, **overrides):
    """A tiny random HF GPTNeoXForCausalLM (q/k/v interleaved per head in one tensor), saved to ``path`` when given."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**TINY_GPT_NEOX, **overrides})).eval()
    if path is not None:
        save_hf(model, path)
    return model


def tiny_qwen2(path: Path | None = None, seed: int = 2, bias_std: float = 0.5, **overrides):
    """A tiny random HF Qwen2ForCausalLM whose q/k/v biases are non-zero (random init leaves them at zero)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, bias_std)
    if path is not None:
        save_hf(model, path)
    return model


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate``'s greedy tokens (EOS ignored), on the model's device (scripts/gpu_parity.py runs it on CUDA)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_step_logprobs(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the logits that produced each generated token: [len(generated), vocab].

    Computed token by token with HF's own KV cache (as generate does), so length-dependent rope scalings see the
    same sequence lengths as during generation.
    """
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    rows = [out.logits[0, -1]]
    past = out.past_key_values
    for tok in generated[:-1]:
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1])
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def tiny_llm(path: Path, model_type: str, **kw) -> LLM:
    return LLM(
        # FP32: parity is checked against fp32 references (the CPU default for WEIGHT_TYPE=FP16 is half-precision
        # weight storage, which is checked separately against the fp32 path).
        ModelConfig(
            model_type=model_type,
            ckpt_path=str(path),
            max_seq_len=kw.pop("max_seq_len", 0),
            weight_type=kw.pop("weight_type", "FP32"),
        ),
        kv_cache_mem_mb=kw.pop("kv_cache_mem_mb", 16),
        skip_tokenizer_init=True,
        **kw,
    )


def assert_close_to_reference(ref: list, outs: list, same_prefix: int = 8, max_mean_diff: float = 0.05) -> None:
    """A lossy mode (half/int8 weights) against the fp32 path: the first ``same_prefix`` greedy tokens identical, and
    the chosen tokens' logprobs within ``max_mean_diff`` on average wherever the token prefixes still agree."""
    diffs = []
    for r, o in zip(ref, outs, strict=True):
        assert o.token_ids[:same_prefix] == r.token_ids[:same_prefix]
        same = [i for i in range(len(r.token_ids)) if o.token_ids[: i + 1] == r.token_ids[: i + 1]]
        diffs += [abs(o.logprobs[i][o.token_ids[i]] - r.logprobs[i][r.token_ids[i]]) for i in same]
    assert sum(diffs) / len(diffs) < max_mean_diff


def check_parity(
    llm: LLM, model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int = 32, atol: float = 1e-3
) -> None:
    """rtp-mm greedy tokens == HF greedy tokens; top-5 logprobs within ``atol`` of HF's."""
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, top_k=1, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, cfg)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf_greedy(model, prompt, max_new_tokens)
        assert out.token_ids == expected, f"prompt {prompt[:6]}...: {out.token_ids} != {expected}"
        assert out.finish_reason == "length"
        ref = hf_step_logprobs(model, prompt, expected)
        for step, entry in enumerate(out.logprobs):
            assert len(entry) >= 5
            for token, lp in entry.items():
                assert abs(lp - float(ref[step, token])) < atol, (step, token, lp, float(ref[step, token]))


# --- checkpoints in the original layout of a MODEL_TYPE (names, fused tensors, config.json as released) ---------
def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: random init leaves biases at 0 and norms at 1, which would hide layout bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict, **extra_json: dict) -> Path:
    """``model.safetensors`` + ``config.json`` (+ any ``name.json`` given as keyword ``name=...``)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, value in extra_json.items():
        (path / f"{name}.json").write_text(json.dumps(value, indent=2))
    return path


def interleave_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[Q | K | V] pieces (weight or bias) -> the per-head ``[q_h, k_h, v_h]`` rows of BLOOM/NeoX/MHA Falcon."""
    parts = [x.reshape(num_heads, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])


def split_per_head(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_per_head, written independently of rtp-mm's transforms."""
    x = fused.reshape(num_heads, 3, -1, *fused.shape[1:])
    return tuple(x[:, j].reshape(-1, *fused.shape[1:]) for j in range(3))  # type: ignore[return-value]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_bpe_tokenizer(path: Path, sentences: list[str], vocab_size: int = 300, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on ``sentences`` and saved to ``path`` (ids 0/1/2 = <unk>/<s>/</s>, Llama's
    default bos/eos), so server tests can send text to tiny random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast
