"""``rtp-mm bench``: rtp-mm against HF transformers ``generate`` on the same weights, in one run.

    python -m rtp_mm.benchmarks                 # rtp-mm FP32, FP16, INT8 weights and FP32 + INT8 KV vs HF fp32
    python -m rtp_mm.benchmarks--quick --skip-hf --only a,c --output BENCHMARKS.md

Workloads (all greedy with EOS ignored, so every system generates exactly the same number of tokens):
  (a) batch-1 decode: one chat prompt, 128 new tokens; decode rate = (n - 1) / (last token - first token).
  (b) serving: 64 requests arriving together, prompts 20-200 tokens, max_new_tokens 16-256, at most 16 in flight.
      rtp-mm runs them with continuous batching; HF runs static left-padded batches of 16 in arrival order, each
      until its longest request ends.
  (c) time to first token of one 150-token prompt, median of 3.
  KV capacity (every rtp-mm system): KV blocks in KV_CACHE_MEM_MB and how many sequences of workload (b)'s longest
      request (prompt + max_new_tokens) fit in them at once: what the scheduler can admit concurrently.

Only the columns in ``--serve-weight-types`` (default FP32) run the serving workload (b): it dominates the run time
(HF alone needs ~4.5 minutes for it on two cores), so the default run stays under ten minutes. The other columns are
measured by decode speed, time to first token and KV capacity; ``--serve-weight-types FP32,FP16`` adds fp16-weight
serving (about three more minutes).

The parent builds the workload once (token ids, so both systems see identical inputs) and runs each system in its
own ``--worker`` subprocess, so peak RSS is per system and no system inherits another's caches or allocator state.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from rtp_mm.benchmarks.report import log, machine_info, rss_now_mb, section_lines, write_section
from rtp_mm.benchmarks.roofline import llama_cpp_available, read_bandwidth_gbs, roofline_pct, run_llama_cpp
from rtp_mm.benchmarks.workload import (
    PHASES,
    RequestTiming,
    StreamTiming,
    Workload,
    build_workload,
    serve_metrics,
    single_metrics,
)

SECTION_HEADING = "## rtp bench (text engine)"


def _greedy(num_new: int) -> Any:
    from rtp_mm import GenerateConfig

    return GenerateConfig(max_new_tokens=num_new, top_k=1, ignore_eos=True)


async def _rtp_stream(llm: Any, ids: list[int], num_new: int) -> StreamTiming:
    start = time.perf_counter()
    first = last = None
    final = None
    async for out in llm.stream_request(llm.make_request(ids, _greedy(num_new))):
        now = time.perf_counter()
        if out.token_ids:
            first = first or now
            last = now
        final = out
    if final is None or first is None or len(final.token_ids) != num_new:
        got = len(final.token_ids) if final is not None else 0
        raise RuntimeError(f"rtp-mm produced {got} tokens where {num_new} were asked")
    return StreamTiming(start, first, last, time.perf_counter(), list(final.token_ids))


async def _rtp_serve(llm: Any, w: Workload) -> list[RequestTiming]:
    limit = asyncio.Semaphore(w.max_in_flight)  # FIFO: requests enter service in arrival order
    arrival = time.perf_counter()

    async def one(ids: list[int], num_new: int) -> RequestTiming:
        async with limit:
            t = await _rtp_stream(llm, ids, num_new)
        return RequestTiming(arrival, t.start, t.first, t.end)

    return list(await asyncio.gather(*(one(p, n) for p, n in zip(w.serve_prompts, w.serve_new_tokens, strict=True))))


INT8_KV_SUFFIX = "+INT8KV"


class SystemSpec(NamedTuple):
    """One rtp-mm column: a WEIGHT_TYPE, optionally with INT8_KV_CACHE=1 (written ``FP32+INT8KV``)."""

    weight_type: str
    int8_kv: bool = False

    @classmethod
    def parse(cls, text: str) -> SystemSpec:
        from rtp_mm.config import WeightType

        name = text.strip().upper()
        int8_kv = name.endswith(INT8_KV_SUFFIX)
        weight = WeightType.parse(name.removesuffix(INT8_KV_SUFFIX), "--weight-types").value
        return cls(weight, int8_kv)

    def __str__(self) -> str:
        return self.weight_type + (INT8_KV_SUFFIX if self.int8_kv else "")


def kv_capacity_metrics(llm: Any, seq_len: int) -> dict[str, float]:
    stats = llm.stats()
    blocks_per_seq = -(-seq_len // stats["block_size"])
    return {"kv_blocks": stats["num_blocks"], "kv_max_seqs": stats["num_blocks"] // blocks_per_seq}


def run_rtp(w: Workload, phases: str, system: SystemSpec, kv_cache_mb: int) -> dict[str, Any]:
    from rtp_mm import LLM, ModelConfig

    start = time.perf_counter()
    llm = LLM(
        ModelConfig(weight_type=system.weight_type),
        kv_cache_mem_mb=kv_cache_mb,
        reuse_cache=False,
        int8_kv_cache=system.int8_kv,
    )
    result: dict[str, Any] = {"metrics": {"load_s": time.perf_counter() - start, "rss_loaded_mb": rss_now_mb()}}
    result["metrics"].update(kv_capacity_metrics(llm, w.longest_request))
    result["metrics"]["weight_mb"] = sum(llm.client.info.rank_weight_bytes) / 2**20
    result["weight_path"] = llm.weight_path
    log(f"rtp-mm {system} loaded in {result['metrics']['load_s']:.0f} s ({llm.weight_path}); running {phases}")
    try:
        llm.generate([w.decode_prompt], _greedy(w.warmup_new_tokens))
        if "a" in phases:
            t = asyncio.run(_rtp_stream(llm, w.decode_prompt, w.decode_new_tokens))
            result["metrics"].update(single_metrics("a", t, w.decode_new_tokens))
            result["decode_ids"] = t.token_ids
        if "c" in phases:
            ttfts = [asyncio.run(_rtp_stream(llm, w.ttft_prompt, 1)) for _ in range(w.ttft_repeats)]
            result["metrics"]["c_ttft_ms"] = statistics.median((t.first - t.start) * 1000 for t in ttfts)
        if "b" in phases:
            timings = asyncio.run(_rtp_serve(llm, w))
            result["metrics"].update(serve_metrics(timings, w.serve_new_tokens))
    finally:
        llm.shutdown()
    return result


def worker_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    w = Workload(**json.loads(Path(args.spec).read_text()))
    system = SystemSpec.parse(args.weight_type)
    result: dict[str, Any] = {"system": args.worker, "weight_type": system.weight_type, "int8_kv": system.int8_kv}
    try:
        if args.worker == "hf":
            from rtp_mm.benchmarks.hf_baseline import run_hf

            result.update(run_hf(w, args.only))
        elif args.worker == "llamacpp":
            result.update(run_llama_cpp(w, args.only, args.threads))
        else:
            result.update(run_rtp(w, args.only, system, args.kv_cache_mb))
        result["metrics"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except Exception as e:  # reported in the table instead of losing the other systems' numbers
        result["error"] = f"{type(e).__name__}: {e}"
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ---- parent: run the workers, print and record the table --------------------------------------------------------
class Metric(NamedTuple):
    key: str
    label: str
    fmt: str


METRICS = (
    Metric("a_decode_tps", "(a) decode tok/s, batch 1", "{:.1f}"),
    Metric("a_e2e_tps", "(a) end-to-end tok/s, batch 1", "{:.1f}"),
    Metric("a_ttft_ms", "(a) TTFT ms, chat prompt", "{:.0f}"),
    Metric("b_tps", "(b) serving: generated tok/s", "{:.1f}"),
    Metric("b_latency_mean_s", "(b) latency mean s (from arrival)", "{:.1f}"),
    Metric("b_latency_p90_s", "(b) latency p90 s (from arrival)", "{:.1f}"),
    Metric("b_ttft_mean_s", "(b) TTFT mean s (from arrival)", "{:.2f}"),
    Metric("b_service_latency_mean_s", "(b) latency mean s (in service)", "{:.1f}"),
    Metric("b_service_ttft_mean_s", "(b) TTFT mean s (in service)", "{:.2f}"),
    Metric("b_wall_s", "(b) wall time s", "{:.1f}"),
    Metric("c_ttft_ms", "(c) TTFT ms, 150-token prompt (median)", "{:.0f}"),
    Metric("weight_mb", "weights read per decoded token MiB", "{:.0f}"),
    Metric("a_roofline_pct", "(a) decode, % of the {bw_gbs:.1f} GB/s roofline", "{:.0f}%"),
    Metric("kv_blocks", "KV blocks in KV_CACHE_MEM_MB={kv_mb}", "{:.0f}"),
    Metric("kv_max_seqs", "max concurrent {seq_len}-token sequences", "{:.0f}"),
    Metric("load_s", "model load s", "{:.1f}"),
    Metric("rss_loaded_mb", "RSS after load MiB", "{:.0f}"),
    Metric("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
)


def system_label(result: dict[str, Any]) -> str:
    if result["system"] == "hf":
        return "HF fp32"
    if result["system"] == "llamacpp":
        return "llama.cpp Q4_1"
    wt = result["weight_type"].lower()
    label = f"rtp-mm {wt}" if wt == "fp32" else f"rtp-mm {wt}-weights"
    return label + (" int8-KV" if result.get("int8_kv") else "")


def run_worker(system: str, spec_: SystemSpec, phases: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    result_path = spec.with_name(f"result-{system}-{spec_}.json")
    cmd = [
        sys.executable,
        "-m",
        "rtp_mm.benchmarks.text",
        "--worker",
        system,
        "--weight-type",
        str(spec_),
        "--spec",
        str(spec),
        "--result",
        str(result_path),
        "--only",
        phases,
        "--threads",
        str(args.threads),
        "--kv-cache-mb",
        str(args.kv_cache_mb),
    ]
    base = {"system": system, "weight_type": spec_.weight_type, "int8_kv": spec_.int8_kv, "metrics": {}}
    log(f"running {system_label(base)} ...")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return base | {"error": f"timed out after {args.worker_timeout} s"}
    if not result_path.exists():
        return base | {"error": f"worker exited with status {proc.returncode} and no result"}
    result = json.loads(result_path.read_text())
    log(
        f"{system_label(result)} done in {time.perf_counter() - start:.0f} s"
        + (f": {result['error']}" if "error" in result else "")
    )
    return result


def render_table(results: list[dict[str, Any]], **label_values: Any) -> str:
    """Markdown table, one column per system; ``label_values`` fill the placeholders of metric labels."""
    rtp = [r for r in results if r["system"] == "rtp"]
    hf = next((r for r in results if r["system"] == "hf"), None)
    header = ["metric", *(system_label(r) for r in results)]
    if hf is not None:
        header += [f"{system_label(r).removeprefix('rtp-mm ')} / HF" for r in rtp]
    rows = []
    for m in METRICS:
        values = [r["metrics"].get(m.key) for r in results]
        if all(v is None for v in values):
            continue
        label = m.label.format(**label_values) if label_values else m.label
        row = [label, *(m.fmt.format(v) if v is not None else "-" for v in values)]
        if hf is not None:
            base = hf["metrics"].get(m.key)
            for r in rtp:
                v = r["metrics"].get(m.key)
                row.append(f"{v / base:.2f}x" if v is not None and base else "-")
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def notes(results: list[dict[str, Any]]) -> list[str]:
    lines = [f"{system_label(r)}: ERROR {r['error']}" for r in results if "error" in r]
    paths = [f"{system_label(r)}: {r['weight_path']}" for r in results if r.get("weight_path")]
    if paths:
        lines.append("weight matmul path per column: " + "; ".join(paths))
    cpp = next((r for r in results if r["system"] == "llamacpp"), None)
    cpp_tps = cpp["metrics"].get("a_decode_tps") if cpp else None
    for r in results:
        tps = r["metrics"].get("a_decode_tps")
        if r["system"] == "rtp" and cpp_tps and tps:
            lines.append(f"(a) decode: {system_label(r)} reaches {tps / cpp_tps:.2f}x llama.cpp's Q4_1 speed")
    hf = next((r for r in results if r["system"] == "hf" and "decode_ids" in r), None)
    for r in results:
        if r["system"] == "rtp" and hf is not None and "decode_ids" in r:
            a, b = r["decode_ids"], hf["decode_ids"]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            lines.append(f"greedy check (a): {system_label(r)} equals HF on the first {same}/{len(b)} tokens")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtp-mm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size: 16 requests, 32 new tokens")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    p.add_argument("--skip-llama-cpp", action="store_true", help="do not run llama.cpp (run when installed)")
    p.add_argument("--only", default="a,b,c", help="workloads to run, comma-separated subset of a,b,c")
    p.add_argument(
        "--weight-types",
        default="FP32,FP16,INT8,FP32+INT8KV",
        help="rtp-mm columns: WEIGHT_TYPEs, '+INT8KV' adds INT8_KV_CACHE=1",
    )
    p.add_argument("--serve-weight-types", default="FP32", help="rtp-mm columns that also run workload (b)")
    p.add_argument("--output", help="markdown file whose '## rtp bench (text engine)' section is written/replaced")
    p.add_argument("--json", help="write every number (and the run's metadata) to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch threads per system (0: torch's default)")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="rtp-mm KV_CACHE_MEM_MB")
    p.add_argument("--seed", type=int, default=0, help="seed of workload (b)")
    p.add_argument("--worker-timeout", type=int, default=1800, help="seconds one system may take")
    p.add_argument("--vision", action="store_true", help="bench the vision encoders instead (see --vision --help)")
    for hidden in ("--worker", "--weight-type", "--spec", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    phases = [s.strip() for s in args.only.split(",") if s.strip()]
    if not phases or any(s not in PHASES for s in phases):
        parser.error(f"--only={args.only!r}: accepted a comma-separated subset of {','.join(PHASES)}")
    args.only = ",".join(phases)
    if args.worker:
        return worker_main(args)

    from rtp_mm.default_model import default_model_path
    from rtp_mm.errors import RtpMmError
    from rtp_mm.tokenizers.loader import load_tokenizer

    try:
        systems_wanted = [SystemSpec.parse(s) for s in args.weight_types.split(",") if s.strip()]
    except RtpMmError as e:
        parser.error(e.message)
    try:
        serving = {SystemSpec.parse(s) for s in args.serve_weight_types.split(",") if s.strip()}
    except RtpMmError as e:
        parser.error(e.message)
    without_b = ",".join(p for p in phases if p != "b")
    # The same loader LLM uses for llm.tokenizer; loaded once here, so the workers get token ids only.
    workload = build_workload(load_tokenizer(str(default_model_path())), args.quick, args.seed)
    load_avg = os.getloadavg()
    bandwidth = read_bandwidth_gbs()  # before any worker: measured on an idle machine
    log(f"memory read bandwidth: {bandwidth:.1f} GB/s")
    with tempfile.TemporaryDirectory(prefix="rtp-bench-") as tmp:
        spec = Path(tmp) / "workload.json"
        spec.write_text(json.dumps(asdict(workload)))
        systems = [("rtp", sp, args.only if sp in serving else without_b) for sp in systems_wanted]
        systems += [] if args.skip_hf else [("hf", SystemSpec("FP32"), args.only)]
        if not args.skip_llama_cpp and llama_cpp_available() and "a" in phases:
            systems.append(("llamacpp", SystemSpec("FP32"), "a"))
        results = [run_worker(system, sp, ph, spec, args) for system, sp, ph in systems if ph]
    for r in results:
        pct = roofline_pct(r["metrics"].get("a_decode_tps"), r["metrics"].get("weight_mb", 0) * 2**20, bandwidth)
        if pct is not None:
            r["metrics"]["a_roofline_pct"] = pct

    command = "rtp-mm bench" + (f" {shlex.join(argv)}" if argv else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info(results, load_avg)
    table = render_table(results, kv_mb=args.kv_cache_mb, seq_len=workload.longest_request, bw_gbs=bandwidth)
    extra = notes(results)
    print(table)
    for line in extra:
        print(line)
    if args.output:
        section = section_lines(
            SECTION_HEADING, command, date, machine, f"Workload: {workload.describe(args.only)}", table
        )
        if not args.skip_hf:
            section.append("Ratios are rtp-mm / HF: above 1, rtp-mm is higher (better for tok/s, worse for times).")
        if "b" in phases:
            section.append(
                "(b) 'from arrival' counts from the moment all requests arrive (queueing included); "
                "'in service' from when a request is admitted (rtp-mm) or its batch starts (HF)."
            )
        section += ["", *(f"- {line}" for line in extra)] if extra else []
        write_section(Path(args.output), "\n".join(section), SECTION_HEADING)
    if args.json:
        payload = {
            "command": command,
            "date": date,
            "machine": machine,
            "read_bandwidth_gbs": bandwidth,
            "workload": workload.describe(args.only),
            "phases": phases,
            "systems": [{"label": system_label(r), **r} for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
