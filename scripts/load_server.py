"""Bounded load test of the HTTP server over loopback.

    python scripts/load_server.py                       # 300 requests, concurrency 32, tiny random Llama
    python scripts/load_server.py --requests 40 --concurrency 8 --json

Builds a tiny random Llama (transformers) with a tiny BPE tokenizer in a temporary folder, serves it on a free
loopback port (the real app, handler cancellation on), and sends a mix of native JSON, native streaming and OpenAI
chat requests through ``rtp_mm.client.AsyncClient`` with at most ``--concurrency`` in flight. ``CONCURRENCY_LIMIT``
equals ``--concurrency``, so a 409 can only come from the race between a client seeing a stream end and the server
releasing its slot: those are counted as intended 409s, not failures. At the end every KV block must be free again.

Prints one summary (``--json``: one JSON line); the exit status is 1 when any request failed otherwise or a KV block
is still in use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny tokenizer for a load test.",
    "rtp-mm serves language models over HTTP with continuous batching.",
    "Streaming responses arrive as server-sent events, one per token.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_checkpoint(path: Path, seed: int = 0) -> None:
    """A random 4-layer Llama (hidden 128) plus a byte-level BPE tokenizer trained on SENTENCES."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).eval().save_pretrained(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(client: Any, kind: str, prompt: str, max_new_tokens: int, record: dict[str, list]) -> None:
    from rtp_mm.client import ConcurrencyLimitError, ServerError

    start = time.perf_counter()
    try:
        if kind == "stream":
            first = None
            tokens = 0
            async for event in client.stream(prompt, max_new_tokens=max_new_tokens, top_k=1, ignore_eos=True):
                first = first or time.perf_counter()
                tokens = event.aux_info["output_len"]
            record["ttft"].append(first - start)
        elif kind == "chat":
            reply = await client.chat(
                [{"role": "user", "content": prompt}], max_tokens=max_new_tokens, extra_configs={"ignore_eos": True}
            )
            tokens = reply.usage["completion_tokens"]
        else:
            out = await client.generate(prompt, max_new_tokens=max_new_tokens, top_k=1, ignore_eos=True)
            tokens = out.aux_info["output_len"]
        record["latency"].append(time.perf_counter() - start)
        record["tokens"].append(tokens)
    except ConcurrencyLimitError:
        record["conflicts"].append(kind)
    except (ServerError, OSError, asyncio.TimeoutError) as e:
        record["failures"].append(f"{kind}: {type(e).__name__}: {e}")


async def run_load(url: str, num_requests: int, concurrency: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    from rtp_mm.client import AsyncClient

    rng = random.Random(seed)
    record: dict[str, list] = {"latency": [], "ttft": [], "tokens": [], "conflicts": [], "failures": []}
    gate = asyncio.Semaphore(concurrency)

    async def guarded(client: AsyncClient, i: int) -> None:
        kind = ("json", "stream", "chat")[i % 3]
        prompt = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6)))
        async with gate:
            await _one(client, kind, prompt, rng.randint(max_new_tokens // 2, max_new_tokens), record)

    async with AsyncClient(url, timeout=300) as client:
        await client.wait_until_ready()
        start = time.perf_counter()
        await asyncio.gather(*(guarded(client, i) for i in range(num_requests)))
        wall = time.perf_counter() - start
        deadline = time.monotonic() + 30
        while True:  # cancelled or finished requests release their blocks within a step
            status = await client.worker_status()
            if status["available_kv_cache"] == status["total_kv_cache"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    done = len(record["latency"])
    return {
        "requests": num_requests,
        "concurrency": concurrency,
        "succeeded": done,
        "intended_409": len(record["conflicts"]),
        "failures": len(record["failures"]),
        "failure_examples": record["failures"][:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 1),
        "generated_tokens": sum(record["tokens"]),
        "generated_tokens_per_s": round(sum(record["tokens"]) / wall, 1),
        "latency_p50_s": round(statistics.median(record["latency"]), 3) if done else None,
        "latency_p99_s": round(_percentile(record["latency"], 0.99), 3),
        "ttft_p50_s": round(_percentile(record["ttft"], 0.5), 3),
        "ttft_p99_s": round(_percentile(record["ttft"], 0.99), 3),
        "kv_tokens_free_at_end": status["available_kv_cache"],
        "kv_tokens_total": status["total_kv_cache"],
        "all_kv_blocks_free": status["available_kv_cache"] == status["total_kv_cache"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    from rtp_mm import EngineClient, EngineConfig, ModelConfig, Settings
    from rtp_mm.server.app import BackgroundServer, create_app

    with tempfile.TemporaryDirectory(prefix="rtp-mm-load-") as tmp:
        build_tiny_checkpoint(Path(tmp), args.seed)
        model = ModelConfig(model_type="llama", ckpt_path=tmp, max_seq_len=512, weight_type="FP32")
        engine = EngineConfig(kv_cache_mem_mb=64, concurrency_limit=args.concurrency)
        settings = Settings(model=model, engine=engine)
        with BackgroundServer(create_app(EngineClient(model, engine), settings, owns_engine=True)) as url:
            result = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_new_tokens, args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0 if result["failures"] == 0 and result["all_kv_blocks_free"] else 1


if __name__ == "__main__":
    sys.exit(main())
