"""``rtp-mm bench --structured``: what structured outputs cost, on the default model, in one run.

    python -m rtp_mm.benchmarks --structured --output BENCHMARKS.md

Rows:
  * batch-1 decode rate (tokens/s after the first token) of a free answer and of the same prompt constrained to a
    JSON schema whose answer is long (40 short strings), both greedy, in one process, alternated ``--repeats``
    times; the ratio is the grammar engine's overhead on the critical path (issue target: at most 20%);
  * the two grammar engines' own cost on this CPU (token-table build, schema compile, mean and worst mask per token
    along one answer): llguidance (used) and xgrammar (when installed; not a dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from rtp_mm.benchmarks.report import log, record_section

SECTION_HEADING = "## rtp bench --structured (grammar engine)"
PROMPT = "List forty short names of fruits or vegetables as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40, "maxItems": 40}
    },
    "required": ["items"],
    "additionalProperties": False,
}


async def _decode_rate(llm: Any, prompt: list[int], config: Any) -> tuple[float, int]:
    """(tokens/s after the first token, tokens generated)."""
    times: list[float] = []
    count = 0
    async for out in llm.generate_stream(prompt, config):
        if out.num_new_tokens:
            times.append(time.perf_counter())
            count = len(out.token_ids)
    return (count - 1) / (times[-1] - times[0]), count


def bench_decode(repeats: int) -> dict[str, Any]:
    from rtp_mm import LLM, GenerateConfig, ModelConfig

    llm = LLM(ModelConfig(weight_type="FP32"), kv_cache_mem_mb=256, reuse_cache=False)
    try:
        prompt = llm.encode(llm.render_chat([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
        constrained = GenerateConfig(max_new_tokens=600, top_k=1, json_schema=SCHEMA)
        answer = llm.generate(prompt, constrained)[0]  # warm-up; builds the token table once
        json.loads(answer.text)
        free = GenerateConfig(max_new_tokens=len(answer.token_ids), top_k=1, ignore_eos=True)
        rates: dict[str, list[float]] = {"free": [], "json_schema": []}
        for _ in range(repeats):
            rates["free"].append(asyncio.run(_decode_rate(llm, prompt, free))[0])
            rates["json_schema"].append(asyncio.run(_decode_rate(llm, prompt, constrained))[0])
        medians = {k: statistics.median(v) for k, v in rates.items()}
        return {"tokens": len(answer.token_ids), "rates": rates, "median": medians, "text": answer.text}
    finally:
        llm.shutdown()


def bench_engines(tokenizer: Any, answer: str) -> list[dict[str, Any]]:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    rows = [_llguidance(tokenizer, ids)]
    try:
        rows.append(_xgrammar(tokenizer, ids))
    except ImportError:
        rows.append({"engine": "xgrammar", "error": "not installed (pip install xgrammar)"})
    return rows


def _timed_masks(fill: Any, consume: Any, ids: list[int]) -> tuple[float, float]:
    times = []
    for token in ids:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        consume(token)
    return statistics.mean(times) * 1e6, max(times) * 1e6


def _llguidance(tokenizer: Any, ids: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.torch as lt

    start = time.perf_counter()
    table = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=len(tokenizer))
    built = time.perf_counter()
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    matcher = llguidance.LLMatcher(table, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), options))
    compiled = time.perf_counter()
    mask = lt.allocate_token_bitmask(1, table.vocab_size)
    mean, worst = _timed_masks(lambda: lt.fill_next_token_bitmask(matcher, mask, 0), matcher.consume_token, ids)
    return {"engine": "llguidance", "table_s": built - start, "compile_ms": (compiled - built) * 1e3, "mean_us": mean,
            "max_us": worst}  # fmt: skip


def _xgrammar(tokenizer: Any, ids: list[int]) -> dict[str, Any]:
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgrammar.GrammarCompiler(info)
    built = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compiled = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(grammar)
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    mean, worst = _timed_masks(lambda: matcher.fill_next_token_bitmask(mask, 0), matcher.accept_token, ids)
    return {"engine": "xgrammar", "table_s": built - start, "compile_ms": (compiled - built) * 1e3, "mean_us": mean,
            "max_us": worst}  # fmt: skip


def render(decode: dict[str, Any], engines: list[dict[str, Any]]) -> str:
    free, constrained = decode["median"]["free"], decode["median"]["json_schema"]

    def runs(kind: str) -> str:
        return ", ".join(f"{r:.1f}" for r in decode["rates"][kind])

    n = decode["tokens"]
    lines = [
        "| batch-1 decode, default model FP32, greedy | tok/s (median) | runs |",
        "|---|---|---|",
        f"| free answer, {n} tokens | {free:.1f} | {runs('free')} |",
        f"| json_schema answer, {n} tokens | {constrained:.1f} | {runs('json_schema')} |",
        f"| **grammar overhead** | **{(free / constrained - 1) * 100:+.1f}% time per token** | |",
        "",
        "| grammar engine | token table | schema compile | mask per token, mean | mask per token, worst |",
        "|---|---|---|---|---|",
    ]
    for row in engines:
        if "error" in row:
            lines.append(f"| {row['engine']} | {row['error']} | | | |")
        else:
            lines.append(
                f"| {row['engine']} | {row['table_s']:.2f} s | {row['compile_ms']:.1f} ms | {row['mean_us']:.1f} us "
                f"| {row['max_us']:.0f} us |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rtp-mm bench --structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of each decode row")
    parser.add_argument("--output", help="markdown file whose section is written/replaced")
    args = parser.parse_args(argv)
    from rtp_mm.default_model import default_model_path
    from rtp_mm.tokenizers.loader import load_tokenizer

    load_avg = os.getloadavg()
    decode = bench_decode(args.repeats)
    log(f"decode: {decode['median']}")
    engines = bench_engines(load_tokenizer(str(default_model_path())), decode["text"])
    table = render(decode, engines)
    print(table)
    if args.output:
        workload = f"Prompt: {PROMPT!r}; schema: 40 strings of at most 24 characters (compact JSON)."
        record_section(args.output, SECTION_HEADING, "rtp-mm bench --structured", argv, load_avg, workload, table)
    return 0
