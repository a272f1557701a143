"""``rtp-mm bench --speculative``: what prompt-lookup speculation (SP_TYPE=prompt_lookup) gains on the default model
on copy-heavy work, in one run.

    python -m rtp_mm.benchmarks --speculative --output BENCHMARKS.md

Rows: per prompt of a copy-heavy set (rewrite, correct, reformat, summarise with quotes, edit code), the batch-1
decode rate (tokens/s after the first token, greedy) of the same model served without and with prompt lookup, the
two engines in one process and alternated ``--repeats`` times; the speed-up of the medians, the acceptance rate
(accepted / proposed tokens), the tokens a step emitted on average, and whether both answers are identical (greedy
speculation must not change them). A last row runs every prompt at once (throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

from rtp_mm.benchmarks.report import log, record_section

SECTION_HEADING = "## rtp bench --speculative (prompt lookup)"
PASSAGE = (
    "The library will close for renovation from the first of March until the end of May. During this time, books "
    "can be returned at the town hall, and the reading room will move to the school on Mill Street. The new "
    "building will have a larger children's section, a quiet study floor and a cafe on the ground floor. Members "
    "who have questions can write to the librarian or call the front desk between nine and five."
)
CODE = (
    "def total(items):\n    x = 0\n    for item in items:\n        if item.price > 0:\n            x = x + item.price\n"
    "    return x\n\n\ndef average(items):\n    x = total(items)\n    return x / len(items)\n"
)
PROMPTS = {
    "rewrite": f"Rewrite the following text word for word, keeping every sentence:\n\n{PASSAGE}",
    "correct": "Correct the spelling in this text and return the whole text:\n\n"
    + PASSAGE.replace("renovation", "renovasion").replace("children's", "childrens"),
    "summarise with quotes": f"Summarise the text below, quoting its two key sentences exactly:\n\n{PASSAGE}",
    "bullet list": f"Turn every sentence of this text into a bullet point, keeping the wording:\n\n{PASSAGE}",
    "edit code": f"In this Python code, rename the variable x to running_sum and return the whole code:\n\n{CODE}",
    "quote and answer": f"{PASSAGE}\n\nWhere will the reading room move? Quote the sentence that says so, then answer.",
}


async def _decode(llm: Any, prompt: list[int], config: Any) -> dict[str, Any]:
    """Tokens/s after the first token, and the final output."""
    times: list[float] = []
    counts: list[int] = []
    final = None
    async for out in llm.generate_stream(prompt, config):
        if out.num_new_tokens:
            times.append(time.perf_counter())
            counts.append(len(out.token_ids))
        final = out
    rate = (counts[-1] - counts[0]) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"rate": rate, "out": final}


def _throughput(llm: Any, prompts: list[list[int]], config: Any) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, config)
    return sum(len(out.token_ids) for out in outs) / (time.perf_counter() - start)


def bench(repeats: int, max_new_tokens: int, k: int, weight_type: str) -> dict[str, Any]:
    from rtp_mm import LLM, GenerateConfig, ModelConfig, SpeculativeConfig

    plain = LLM(ModelConfig(weight_type=weight_type), kv_cache_mem_mb=512)
    spec_config = ModelConfig(weight_type=weight_type, gen_num_per_circle=k)
    lookup = LLM(spec_config, kv_cache_mem_mb=512, speculative=SpeculativeConfig("prompt_lookup"))
    try:
        config = GenerateConfig(max_new_tokens=max_new_tokens, top_k=1)
        prompts = {name: plain.chat_ids([{"role": "user", "content": text}]) for name, text in PROMPTS.items()}
        for llm in (plain, lookup):  # warm-up
            llm.generate([prompts["rewrite"]], GenerateConfig(max_new_tokens=8, top_k=1))
        rows = []
        for name, prompt in prompts.items():
            runs: dict[str, list[dict[str, Any]]] = {"plain": [], "lookup": []}
            for _ in range(repeats):
                runs["plain"].append(asyncio.run(_decode(plain, prompt, config)))
                runs["lookup"].append(asyncio.run(_decode(lookup, prompt, config)))
            out_plain, out_lookup = runs["plain"][-1]["out"], runs["lookup"][-1]["out"]
            aux = out_lookup.aux_info
            rows.append(
                {
                    "name": name,
                    "prompt_tokens": len(prompt),
                    "tokens": len(out_lookup.token_ids),
                    "plain": [r["rate"] for r in runs["plain"]],
                    "lookup": [r["rate"] for r in runs["lookup"]],
                    "proposed": aux["sp_proposed_len"],
                    "accepted": aux["sp_accepted_len"],
                    "steps": aux["iter_count"],
                    "identical": out_plain.token_ids == out_lookup.token_ids,
                }
            )
            log(f"{name}: {statistics.median(rows[-1]['plain']):.1f} -> {statistics.median(rows[-1]['lookup']):.1f}")
        batch = list(prompts.values())
        together = {"plain": _throughput(plain, batch, config), "lookup": _throughput(lookup, batch, config)}
        stats = lookup.client.stats()
        return {"rows": rows, "together": together, "stats": stats, "k": k, "weight_type": weight_type}
    finally:
        plain.shutdown()
        lookup.shutdown()


def render(result: dict[str, Any]) -> str:
    k, weight = result["k"], result["weight_type"]
    lines = [
        f"| batch-1 decode, default model {weight}, greedy | tokens | plain tok/s (median) | prompt lookup tok/s "
        f"(median, GEN_NUM_PER_CIRCLE={k}) | speed-up | accepted / proposed | tokens per step | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    speedups = []
    for row in result["rows"]:
        plain, lookup = statistics.median(row["plain"]), statistics.median(row["lookup"])
        speedups.append(lookup / plain)
        rate = row["accepted"] / row["proposed"] if row["proposed"] else 0.0
        lines.append(
            f"| {row['name']} ({row['prompt_tokens']}-token prompt) | {row['tokens']} | {plain:.1f} | {lookup:.1f} "
            f"| **{lookup / plain:.2f}x** | {row['accepted']} / {row['proposed']} ({rate:.0%}) "
            f"| {row['tokens'] / row['steps']:.2f} | {'yes' if row['identical'] else 'NO'} |"
        )
    stats, together = result["stats"], result["together"]
    lines += [
        f"| **all prompts, median speed-up** | | | | **{statistics.median(speedups):.2f}x** "
        f"| {stats['spec_accepted_tokens']} / {stats['spec_proposed_tokens']} "
        f"({stats['spec_acceptance_rate']:.0%}, whole run) | | |",
        f"| all {len(result['rows'])} prompts at once (throughput, tok/s incl. prefill) | | {together['plain']:.1f} "
        f"| {together['lookup']:.1f} | {together['lookup'] / together['plain']:.2f}x | | | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rtp-mm bench --speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of each row")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--gen-num-per-circle", type=int, default=5, help="tokens proposed per step")
    parser.add_argument("--weight-type", default="FP32", help="WEIGHT_TYPE of both engines")
    parser.add_argument("--output", help="markdown file whose section is written/replaced")
    args = parser.parse_args(argv)
    load_avg = os.getloadavg()
    result = bench(args.repeats, args.max_new_tokens, args.gen_num_per_circle, args.weight_type)
    table = render(result)
    print(table)
    if args.output:
        workload = (
            f"Prompts: {len(PROMPTS)} copy-heavy chat prompts on one passage or one function ({', '.join(PROMPTS)}), "
            f"through the model's chat template; greedy, at most {args.max_new_tokens} new tokens. Prompt lookup "
            "proposes the continuation of the latest earlier occurrence of the last 4- down to 2-gram; the plain "
            "engine is the same model without speculation."
        )
        record_section(args.output, SECTION_HEADING, "rtp-mm bench --speculative", argv, load_avg, workload, table)
    return 0
