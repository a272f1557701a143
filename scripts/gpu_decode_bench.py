"""Decode throughput of rtp-mm on CUDA at batch sizes 1, 8 and 32 (``rtp-mm bench`` is CPU-only and has no batch
option).

The model is ``--model`` (a checkpoint folder or GGUF file), else the built-in default model when its package is
installed, else a random llama of SmolLM2-135M's shape (same parameter count and layout, so the same bytes per token:
throughput does not depend on the weights' values, and the machine needs no download). Each batch runs
``--short`` and ``--long`` new tokens from the same prompts; the decode rate is the difference of the two runs'
tokens over the difference of their times, which cancels admission, prefill and the first step.

    python scripts/gpu_decode_bench.py [--batch-sizes 1,8,32] [--model PATH] [--weight-type FP16] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(  # HF config of HuggingFaceTB/SmolLM2-135M
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
PROMPT_LEN = 32


def resolve_model(arg: str, folder: Path) -> tuple[str, str, int]:
    """(checkpoint path, MODEL_TYPE, vocabulary size for the random prompts)."""
    if arg:
        return arg, "", 1000
    try:
        from rtp_mm.default_model import DEFAULT_MODEL_TYPE, default_model_path

        return str(default_model_path()), DEFAULT_MODEL_TYPE, 1000
    except Exception as err:  # the default model's package is optional: fall back to a random model of its shape
        print(f"default model unavailable ({type(err).__name__}); using a random llama of SmolLM2-135M's shape")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(str(folder / "smollm2_shape"))
    return str(folder / "smollm2_shape"), "llama", SMOLLM2_135M["vocab_size"]


def timed_generate(llm, prompts: list[list[int]], new_tokens: int) -> float:
    from rtp_mm import GenerateConfig

    start = time.perf_counter()
    outs = llm.generate(
        prompts, GenerateConfig(max_new_tokens=new_tokens, top_k=1, ignore_eos=True)
    )  # host tokens: synced
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--model", default="", help="checkpoint folder or GGUF file (default: see the docstring)")
    parser.add_argument("--weight-type", default="FP16", help="WEIGHT_TYPE: FP16, BF16, FP32, INT8")
    parser.add_argument("--short", type=int, default=16, help="new tokens of the short run")
    parser.add_argument("--long", type=int, default=144, help="new tokens of the long run")
    parser.add_argument("--device", default="cuda", help="cuda (the bench), or cpu for a smoke run of the script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_decode_bench: no CUDA device (torch.cuda.is_available() is False); this bench needs an NVIDIA GPU")
        return 2
    from rtp_mm import LLM, ModelConfig

    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path, model_type, vocab = resolve_model(args.model, Path(tmp))
        config = ModelConfig(model_type=model_type, ckpt_path=path, weight_type=args.weight_type)
        with LLM(config, device=args.device, kv_cache_mem_mb=4096, skip_tokenizer_init=True) as llm:
            name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
            print(f"device: {name}; model: {path} ({llm.model_type.name}, {llm.dtype})")
            g = torch.Generator().manual_seed(0)
            timed_generate(llm, [[5] * PROMPT_LEN], args.short)  # warm-up: allocator, kernels' first compilation
            print("| batch | decode tokens/s | ms per step | short run s | long run s |")
            print("|---|---|---|---|---|")
            for batch in batches:
                prompts = [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]
                short = timed_generate(llm, prompts, args.short)
                long = timed_generate(llm, prompts, args.long)
                steps = args.long - args.short
                rate = batch * steps / (long - short)
                print(f"| {batch} | {rate:.0f} | {1000 * (long - short) / steps:.2f} | {short:.2f} | {long:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
