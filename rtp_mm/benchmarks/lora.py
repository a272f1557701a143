"""``rtp-mm bench --lora``: multi-LoRA throughput, a batch of 16 requests with 0, 1 and 4 adapters, in one run.

    python -m rtp_mm.benchmarks --lora --output BENCHMARKS.md

A small random Llama and random rank-16 adapters on all seven projections are written to a temporary folder (no
download; the adapters in PEFT's file format, written directly). Each row submits 16 greedy requests at once (same
prompt length, ``--new-tokens`` each) and reports generated tokens per second of wall time, the median of
``--repeats`` rounds. The three engines (no adapter, one merged, four apart) are loaded together and every round
visits every row, so a burst of load from other processes on a shared machine (which stalls a multi-threaded
matmul many times over) spreads over the rows instead of landing on one:

  * base model, no adapter loaded (the plain path);
  * base model with 4 adapters loaded (the wrappers' cost when a step has no adapter row);
  * 1 adapter merged into the weights (LORA_INFO with exactly one entry);
  * 1 adapter kept apart, all 16 requests on it (one grouped update per projection);
  * 4 adapters kept apart, mixed 4 x 4 in the batch (four grouped updates per projection).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rtp_mm.benchmarks.report import log, record_section

SECTION_HEADING = "## rtp bench --lora (multi-LoRA throughput)"
BATCH = 16
PROMPT_TOKENS = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_model(path: Path, hidden: int, layers: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64 // 4 or 1,
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return config.to_dict()


def write_adapter(path: Path, config: dict[str, Any], rank: int, seed: int) -> str:
    """A random PEFT LoRA folder for the Llama ``config`` (what peft's save_pretrained writes)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    shapes |= {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for name, (out_features, in_features) in shapes.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{kind}.{name}"
            tensors[prefix + ".lora_A.weight"] = torch.randn(rank, in_features, generator=g) * in_features**-0.5
            tensors[prefix + ".lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (path / "adapter_config.json").write_text(json.dumps(adapter | {"bias": "none"}))
    return str(path)


def _throughput(llm: Any, adapters: list[str | None], new_tokens: int) -> float:
    """Generated tokens per second of one batch of BATCH requests submitted at once."""
    from rtp_mm import GenerateConfig

    prompts = [[(7 * i + j) % 31000 + 100 for j in range(PROMPT_TOKENS)] for i in range(BATCH)]
    configs = [GenerateConfig(max_new_tokens=new_tokens, top_k=1, ignore_eos=True, adapter_name=a) for a in adapters]
    requests = [llm.make_request(p, c) for p, c in zip(prompts, configs, strict=True)]
    start = time.perf_counter()
    outs = llm.client.run(requests)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def bench(hidden: int, layers: int, rank: int, new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    from rtp_mm import LLM, ModelConfig

    with tempfile.TemporaryDirectory(prefix="rtp-mm-lora-bench-") as tmp:
        root = Path(tmp)
        config = write_model(root / "base", hidden, layers)
        paths = {name: write_adapter(root / name, config, rank, seed) for seed, name in enumerate("abcd")}

        def engine(lora_infos: dict[str, str] | None) -> Any:
            base = str(root / "base")
            model = ModelConfig(model_type="llama", ckpt_path=base, weight_type="FP32", lora_infos=lora_infos)
            return LLM(model, kv_cache_mem_mb=64, skip_tokenizer_init=True, reuse_cache=False)

        engines = {"plain": engine(None), "merged": engine({"a": paths["a"]}), "apart": engine(paths)}
        cases = [
            ("plain", "base model, no adapter loaded", [None] * BATCH),
            ("apart", "base model, 4 adapters loaded, none requested", [None] * BATCH),
            ("merged", "1 adapter, merged into the weights", ["a"] * BATCH),
            ("apart", "1 adapter, kept apart (all 16 requests)", ["a"] * BATCH),
            ("apart", "4 adapters, kept apart, mixed 4 x 4", list("abcd") * (BATCH // 4)),
        ]
        rates: list[list[float]] = [[] for _ in cases]
        try:
            for kind, _, adapters in cases:  # warm-up: the first calls of each engine and path set kernels up
                _throughput(engines[kind], adapters, new_tokens)
            for round_index in range(repeats):
                for k, (kind, _, adapters) in enumerate(cases):
                    rates[k].append(_throughput(engines[kind], adapters, new_tokens))
                log(f"round {round_index + 1}: " + ", ".join(f"{r[-1]:.0f}" for r in rates) + " tok/s")
        finally:
            for llm in engines.values():
                llm.shutdown()
    return [
        {"label": label, "rates": r, "median": statistics.median(r)}
        for (_, label, _), r in zip(cases, rates, strict=True)
    ]


def render(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["median"]
    lines = [
        f"| batch of {BATCH}, greedy | tok/s (median) | vs base | runs |",
        "|---|---|---|---|",
    ]
    for row in rows:
        runs = ", ".join(f"{r:.1f}" for r in row["rates"])
        lines.append(f"| {row['label']} | {row['median']:.1f} | {row['median'] / base:.2f}x | {runs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rtp-mm bench --lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds over every row (after a warm-up)")
    parser.add_argument("--output", help="markdown file whose section is written/replaced")
    args = parser.parse_args(argv)
    load_avg = os.getloadavg()
    rows = bench(args.hidden, args.layers, args.rank, args.new_tokens, args.repeats)
    table = render(rows)
    print(table)
    if args.output:
        workload = (
            f"Random Llama (hidden {args.hidden}, {args.layers} layers, GQA 4:1, vocab 32000, FP32, oneDNN-packed), "
            f"random rank-{args.rank} adapters on all seven projections; {BATCH} requests of {PROMPT_TOKENS} prompt "
            f"tokens and {args.new_tokens} new tokens submitted at once; tokens generated per second of wall time. "
            "Three engines (no adapter; one merged; four kept apart) are loaded side by side and every round runs "
            "every row. The first two rows do the same work on two engines: their gap is engine-to-engine noise. One "
            "adapter kept apart costs two small matmuls per projection; several are applied together from their "
            "stacked weights (a matmul, a row mask, a matmul per projection)."
        )
        record_section(args.output, SECTION_HEADING, "rtp-mm bench --lora", argv, load_avg, workload, table)
    return 0
