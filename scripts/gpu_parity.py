"""Greedy parity of rtp-mm against HF transformers on CUDA, for three families (llama, qwen_2, gpt_neox).

Tiny random HF models are built with the test kit's builders (tests/rtp_mm_testing/oracle.py),
saved to a temporary folder and served by ``rtp_mm.LLM`` with DEVICE cuda. In FP32 every prompt's greedy tokens
must equal HF ``generate``'s on the same GPU (the exit status says whether they do); FP16 is reported as the share
of prompts whose tokens agree (informational: tiny random models have near ties that half precision can flip).

    python scripts/gpu_parity.py [--max-new-tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [5, 9, 17, 23, 3, 31, 12, 40]  # odd lengths across KV blocks, several prefill chunk sizes


def families(folder: Path) -> list[tuple[str, str, torch.nn.Module, int]]:
    """(name, MODEL_TYPE, HF model saved under folder/name, vocabulary size)."""
    sys.path.insert(0, str(ROOT / "tests"))  # the test kit's builders, so the models are the ones the tests use
    from rtp_mm_testing.oracle import TINY_GPT_NEOX, TINY_LLAMA, TINY_QWEN2, tiny_gpt_neox, tiny_llama, tiny_qwen2

    partial_rotary = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}

    return [
        ("llama", "llama", tiny_llama(folder / "llama"), TINY_LLAMA["vocab_size"]),
        ("qwen2", "qwen_2", tiny_qwen2(folder / "qwen2"), TINY_QWEN2["vocab_size"]),
        (
            "gpt_neox",
            "gpt_neox",
            tiny_gpt_neox(folder / "gpt_neox", rope_parameters=partial_rotary),
            TINY_GPT_NEOX["vocab_size"],
        ),
    ]


def check_family(
    name, model_type, model, vocab, path: Path, weight_type: str, max_new_tokens: int, device: str
) -> tuple[int, int]:
    """(prompts whose greedy tokens equal HF's, prompts)."""
    from rtp_mm import LLM, GenerateConfig, ModelConfig
    from rtp_mm_testing.oracle import hf_greedy  # importable once families() put the test kit on sys.path

    dtype = torch.float32 if weight_type == "FP32" else torch.float16
    hf = model.to(device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    config = ModelConfig(model_type=model_type, ckpt_path=str(path), weight_type=weight_type)
    with LLM(config, device=device, kv_cache_mem_mb=64, skip_tokenizer_init=True) as llm:
        outs = llm.generate(prompts, GenerateConfig(max_new_tokens=max_new_tokens, top_k=1, ignore_eos=True))
    same = 0
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf_greedy(hf, prompt, max_new_tokens)
        if out.token_ids == expected:
            same += 1
        else:
            first = next(i for i, (a, b) in enumerate(zip(out.token_ids, expected, strict=False)) if a != b)
            print(f"  {name} {weight_type} prompt of {len(prompt)}: first difference at token {first}")
    return same, len(prompts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a smoke run of the script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device (torch.cuda.is_available() is False); this check needs an NVIDIA GPU")
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_type, model, vocab in families(Path(tmp)):
            for weight_type in ("FP32", "FP16"):
                start = time.perf_counter()
                same, total = check_family(
                    name, model_type, model, vocab, Path(tmp) / name, weight_type, args.max_new_tokens, args.device
                )
                strict = weight_type == "FP32"
                verdict = ("PASS" if same == total else "FAIL") if strict else "info"
                failed |= strict and same != total
                took = time.perf_counter() - start
                print(f"{verdict} {name} {weight_type}: {same}/{total} prompts greedy-identical to HF ({took:.1f} s)")
    print("parity: " + ("FAILED" if failed else "all FP32 families identical to HF"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
