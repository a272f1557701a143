"""``rtp-mm bench``: rtp-mm against HF transformers ``generate`` on the same weights, in one run.

    python -m rtp_mm.bench                       # rtp-mm FP32, FP16, INT8 weights and FP32 + INT8 KV vs HF fp32
    python -m rtp_mm.bench --quick --skip-hf --only a,c --output BENCHMARKS.md

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
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

SECTION_HEADING = "## rtp bench (text engine)"
PHASES = ("a", "b", "c")
DECODE_MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
# Prefill cost does not depend on the words, but real text keeps the prompt realistic for the tokenizer.
TTFT_TEXT = (
    "The lighthouse stood on a spur of black rock at the mouth of the bay, and for forty years its lamp had turned "
    "every night without fail. The keeper climbed the spiral stair at dusk, trimmed the wick, wound the clockwork "
    "that rotated the lens, and wrote the weather in a leather logbook: wind from the south-west, sea moderate, "
    "visibility good. Ships passing in the dark saw the double flash every ten seconds and knew where they were. "
)
RANDOM_ID_LOW = 1000  # random prompt ids start above the special and byte tokens


@dataclass(frozen=True)
class Workload:
    """Every input of one run, as token ids. Invariant: ``len(serve_prompts) == len(serve_new_tokens)``."""

    decode_prompt: list[int]
    decode_new_tokens: int
    warmup_new_tokens: int
    serve_prompts: list[list[int]]
    serve_new_tokens: list[int]
    max_in_flight: int
    ttft_prompt: list[int]
    ttft_repeats: int
    seed: int

    @property
    def longest_request(self) -> int:
        """Tokens of workload (b)'s longest request (prompt + max_new_tokens): the KV capacity rows count these."""
        return max(len(p) + n for p, n in zip(self.serve_prompts, self.serve_new_tokens, strict=True))

    def describe(self, phases: str = "abc") -> str:
        lens = [len(p) for p in self.serve_prompts]
        parts = {
            "a": f"(a) chat prompt of {len(self.decode_prompt)} tokens, {self.decode_new_tokens} new tokens, batch 1.",
            "b": f"(b) {len(lens)} requests arriving at once, prompts {min(lens)}-{max(lens)} tokens (random ids, "
            f"seed {self.seed}), max_new_tokens {min(self.serve_new_tokens)}-{max(self.serve_new_tokens)} (sum "
            f"{sum(self.serve_new_tokens)}), at most {self.max_in_flight} in flight; rtp-mm: continuous batching "
            f"(asyncio + Semaphore); HF: static left-padded batches of {self.max_in_flight} in arrival order, each run "
            "to its longest request.",
            "c": f"(c) {len(self.ttft_prompt)}-token prompt, 1 new token, median of {self.ttft_repeats}.",
        }
        chosen = " ".join(text for key, text in parts.items() if key in phases)
        chosen += (
            f" KV capacity: sequences of {self.longest_request} tokens (workload (b)'s longest request) "
            "that fit in the KV cache at once."
        )
        return f"{chosen} All greedy with EOS ignored, after one {self.warmup_new_tokens}-token warm-up per system."


def build_workload(tokenizer: Any, quick: bool, seed: int) -> Workload:
    import torch

    generator = torch.Generator().manual_seed(seed)
    num_requests, new_low, new_high = (16, 16, 32) if quick else (64, 16, 256)
    lens = torch.randint(20, 201, (num_requests,), generator=generator).tolist()
    new_tokens = torch.randint(new_low, new_high + 1, (num_requests,), generator=generator).tolist()
    vocab = len(tokenizer)
    prompts = [torch.randint(RANDOM_ID_LOW, vocab, (n,), generator=generator).tolist() for n in lens]
    chat = tokenizer.apply_chat_template(DECODE_MESSAGES, tokenize=False, add_generation_prompt=True)
    text_ids = list(tokenizer.encode(TTFT_TEXT, add_special_tokens=False))
    return Workload(
        decode_prompt=list(tokenizer.encode(chat, add_special_tokens=False)),
        decode_new_tokens=32 if quick else 128,
        warmup_new_tokens=8,
        serve_prompts=prompts,
        serve_new_tokens=new_tokens,
        max_in_flight=16,
        ttft_prompt=(text_ids * (150 // len(text_ids) + 1))[:150],
        ttft_repeats=3,
        seed=seed,
    )


# ---- timing records shared by both systems ----------------------------------------------------------------------
@dataclass
class StreamTiming:
    """One request run alone: perf_counter stamps of its start, first and last generated token, and return."""

    start: float
    first: float
    last: float
    end: float
    token_ids: list[int] = field(default_factory=list)


class RequestTiming(NamedTuple):
    arrival: float  # the workload start: every request of (b) arrives at once
    submit: float  # when it entered service (rtp-mm: semaphore acquired; HF: its batch started)
    first: float
    end: float


def single_metrics(prefix: str, t: StreamTiming, num_new: int) -> dict[str, float]:
    metrics = {f"{prefix}_ttft_ms": (t.first - t.start) * 1000, f"{prefix}_e2e_tps": num_new / (t.end - t.start)}
    if num_new > 1:
        metrics[f"{prefix}_decode_tps"] = (num_new - 1) / (t.last - t.first)
    return metrics


def serve_metrics(timings: list[RequestTiming], new_tokens: list[int]) -> dict[str, float]:
    start = min(r.arrival for r in timings)
    wall = max(r.end for r in timings) - start
    latency = [r.end - r.arrival for r in timings]
    return {
        "b_wall_s": wall,
        "b_tps": sum(new_tokens) / wall,
        "b_latency_mean_s": statistics.fmean(latency),
        "b_latency_p90_s": percentile(latency, 90),
        "b_ttft_mean_s": statistics.fmean(r.first - r.arrival for r in timings),
        "b_service_latency_mean_s": statistics.fmean(r.end - r.submit for r in timings),
        "b_service_ttft_mean_s": statistics.fmean(r.first - r.submit for r in timings),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ---- rtp-mm worker ----------------------------------------------------------------------------------------------
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
    bm = llm.engine.block_manager
    return {"kv_blocks": bm.num_blocks, "kv_max_seqs": bm.num_blocks // bm.blocks_needed(seq_len)}


def run_rtp(w: Workload, phases: str, system: SystemSpec, kv_cache_mb: int) -> dict[str, Any]:
    from rtp_mm import LLM, ModelConfig

    start = time.perf_counter()
    llm = LLM(
        ModelConfig(weight_type=system.weight_type),
        kv_cache_mem_mb=kv_cache_mb,
        reuse_cache=False,
        int8_kv_cache=system.int8_kv,
    )
    result: dict[str, Any] = {"metrics": {"load_s": time.perf_counter() - start, "rss_loaded_mb": _rss_now_mb()}}
    result["metrics"].update(kv_capacity_metrics(llm, w.longest_request))
    result["weight_path"] = llm.weight_path
    _log(f"rtp-mm {system} loaded in {result['metrics']['load_s']:.0f} s ({llm.weight_path}); running {phases}")
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


# ---- HF transformers worker -------------------------------------------------------------------------------------
class _StepClock:
    """A generate() streamer that only stamps times: put() #0 is the prompt, put() #k the k-th generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model: Any, rows: list[list[int]], num_new: int, pad_id: int) -> tuple[Any, _StepClock]:
    """Left-padded static batch; min_new_tokens = max_new_tokens keeps EOS from ending any row early."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    clock = _StepClock()
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    if out.shape[1] != width + num_new or len(clock.times) != num_new + 1:
        raise RuntimeError(f"HF generated {out.shape[1] - width} steps where {num_new} were asked")
    return out[:, width:], clock


def _hf_single(model: Any, ids: list[int], num_new: int, pad_id: int) -> StreamTiming:
    start = time.perf_counter()
    out, clock = _hf_generate(model, [ids], num_new, pad_id)
    return StreamTiming(start, clock.times[1], clock.times[-1], time.perf_counter(), out[0].tolist())


def _hf_serve(model: Any, w: Workload, pad_id: int) -> list[RequestTiming]:
    timings = []
    arrival = time.perf_counter()
    for lo in range(0, len(w.serve_prompts), w.max_in_flight):
        batch = range(lo, min(lo + w.max_in_flight, len(w.serve_prompts)))
        submit = time.perf_counter()
        _, clock = _hf_generate(
            model, [w.serve_prompts[i] for i in batch], max(w.serve_new_tokens[i] for i in batch), pad_id
        )
        end = time.perf_counter()
        timings += [RequestTiming(arrival, submit, clock.times[1], end) for _ in batch]
    return timings


def load_hf_default_model() -> Any:
    """HF ``LlamaForCausalLM`` in fp32 holding the default GGUF's weights as rtp-mm's reader dequantizes them (the
    same tensors as transformers' own GGUF loader, see tests/llm/test_default_model_parity.py, which takes ~25 s
    longer here to produce them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rtp_mm.default_model import default_model_path
    from rtp_mm.llm.loader.gguf_reader import GGUFCheckpoint

    with GGUFCheckpoint(default_model_path()) as ckpt:
        config = ckpt.config()
        state = dict(ckpt.iter_tensors())
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF model does not fit the checkpoint: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def run_hf(w: Workload, phases: str) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    model = load_hf_default_model()
    result: dict[str, Any] = {"metrics": {"load_s": time.perf_counter() - start, "rss_loaded_mb": _rss_now_mb()}}
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else model.config.eos_token_id
    _log(f"HF loaded in {result['metrics']['load_s']:.0f} s; running {phases}")
    _hf_generate(model, [w.decode_prompt], w.warmup_new_tokens, pad_id)
    if "a" in phases:
        t = _hf_single(model, w.decode_prompt, w.decode_new_tokens, pad_id)
        result["metrics"].update(single_metrics("a", t, w.decode_new_tokens))
        result["decode_ids"] = t.token_ids
    if "c" in phases:
        ttfts = [_hf_single(model, w.ttft_prompt, 1, pad_id) for _ in range(w.ttft_repeats)]
        result["metrics"]["c_ttft_ms"] = statistics.median((t.first - t.start) * 1000 for t in ttfts)
    if "b" in phases:
        result["metrics"].update(serve_metrics(_hf_serve(model, w, pad_id), w.serve_new_tokens))
    return result


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    w = Workload(**json.loads(Path(args.spec).read_text()))
    system = SystemSpec.parse(args.weight_type)
    result: dict[str, Any] = {"system": args.worker, "weight_type": system.weight_type, "int8_kv": system.int8_kv}
    try:
        if args.worker == "hf":
            result.update(run_hf(w, args.only))
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
    Metric("kv_blocks", "KV blocks in KV_CACHE_MEM_MB={kv_mb}", "{:.0f}"),
    Metric("kv_max_seqs", "max concurrent {seq_len}-token sequences", "{:.0f}"),
    Metric("load_s", "model load s", "{:.1f}"),
    Metric("rss_loaded_mb", "RSS after load MiB", "{:.0f}"),
    Metric("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
)


def system_label(result: dict[str, Any]) -> str:
    if result["system"] == "hf":
        return "HF fp32"
    wt = result["weight_type"].lower()
    label = f"rtp-mm {wt}" if wt == "fp32" else f"rtp-mm {wt}-weights"
    return label + (" int8-KV" if result.get("int8_kv") else "")


def run_worker(system: str, spec_: SystemSpec, phases: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    result_path = spec.with_name(f"result-{system}-{spec_}.json")
    cmd = [
        sys.executable,
        "-m",
        "rtp_mm.bench",
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
    _log(f"running {system_label(base)} ...")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return base | {"error": f"timed out after {args.worker_timeout} s"}
    if not result_path.exists():
        return base | {"error": f"worker exited with status {proc.returncode} and no result"}
    result = json.loads(result_path.read_text())
    _log(
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
    hf = next((r for r in results if r["system"] == "hf" and "decode_ids" in r), None)
    for r in results:
        if r["system"] == "rtp" and hf is not None and "decode_ids" in r:
            a, b = r["decode_ids"], hf["decode_ids"]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            lines.append(f"greedy check (a): {system_label(r)} equals HF on the first {same}/{len(b)} tokens")
    return lines


def machine_info(results: list[dict[str, Any]], load_avg: tuple[float, float, float]) -> str:
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    ram_gib = float("nan")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), cpu)
        meminfo = Path("/proc/meminfo").read_text()
        ram_gib = int(next(ln for ln in meminfo.splitlines() if ln.startswith("MemTotal:")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    threads = sorted({r["threads"] for r in results if "threads" in r})
    load = " / ".join(f"{x:.1f}" for x in load_avg)
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_gib:.0f} GiB RAM, load average (1/5/15 min) at start {load}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch threads {'/'.join(map(str, threads)) or '?'}"
    )


def section_lines(heading: str, command: str, date: str, machine: str, description: str, table: str) -> list[str]:
    """The opening of a BENCHMARKS.md section: what ran, when, where, on what, and the table."""
    return [
        heading,
        "",
        f"Command: `{command}`",
        "",
        f"Date: {date}",
        "",
        f"Machine: {machine}",
        "",
        description,
        "",
        table,
        "",
    ]


def write_section(path: Path, section: str, heading: str = SECTION_HEADING) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, heading, section))


def replace_section(text: str, heading: str, section: str) -> str:
    """Replace the ``heading`` section (up to the next heading of level 1 or 2) or append it."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    block = section.rstrip("\n") + "\n"
    if start is None:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtp-mm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size: 16 requests, 32 new tokens")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
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
    if "--vision" in argv:  # the vision-encoder bench has its own flags (rtp_mm.bench_vision)
        from rtp_mm.bench_vision import main as vision_main

        return vision_main([a for a in argv if a != "--vision"])
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
    from rtp_mm.tokenizer import load_tokenizer

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
    with tempfile.TemporaryDirectory(prefix="rtp-bench-") as tmp:
        spec = Path(tmp) / "workload.json"
        spec.write_text(json.dumps(asdict(workload)))
        systems = [("rtp", sp, args.only if sp in serving else without_b) for sp in systems_wanted]
        systems += [] if args.skip_hf else [("hf", SystemSpec("FP32"), args.only)]
        results = [run_worker(system, sp, ph, spec, args) for system, sp, ph in systems if ph]

    command = "rtp-mm bench" + (f" {shlex.join(argv)}" if argv else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info(results, load_avg)
    table = render_table(results, kv_mb=args.kv_cache_mb, seq_len=workload.longest_request)
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
        write_section(Path(args.output), "\n".join(section))
    if args.json:
        payload = {
            "command": command,
            "date": date,
            "machine": machine,
            "workload": workload.describe(args.only),
            "phases": phases,
            "systems": [{"label": system_label(r), **r} for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
