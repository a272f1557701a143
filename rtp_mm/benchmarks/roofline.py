"""The bench's yardsticks beside HF transformers: this machine's memory read bandwidth (the batch-1 decode roofline:
every weight is read once per token) and llama.cpp on the same GGUF when ``llama-cpp-python`` is installed (the
optional ``bench`` extra; never a test dependency)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from rtp_mm.benchmarks.report import log, rss_now_mb
from rtp_mm.benchmarks.workload import StreamTiming, Workload, single_metrics

BANDWIDTH_MB = 1024  # far above any cache, so the sum streams from DRAM


def read_bandwidth_gbs(repeats: int = 5) -> float:
    """Best of ``repeats`` sums over a 1 GiB float32 buffer with torch's threads: GB/s read from memory."""
    import torch

    x = torch.ones(BANDWIDTH_MB * 2**20 // 4)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def roofline_pct(decode_tps: float | None, weight_bytes: float | None, bandwidth_gbs: float) -> float | None:
    """Measured batch-1 decode as a percentage of bandwidth / bytes read per token (the weights; a short context's
    KV is negligible beside them)."""
    if not decode_tps or not weight_bytes:
        return None
    return 100.0 * decode_tps * weight_bytes / (bandwidth_gbs * 1e9)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def run_llama_cpp(w: Workload, phases: str, threads: int) -> dict[str, Any]:
    """Workload (a) on llama.cpp with the default model's own GGUF (Q4_1): greedy over the same token ids."""
    from llama_cpp import Llama

    from rtp_mm.default_model import default_model_path

    path = Path(default_model_path())
    start = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads or os.cpu_count(), verbose=False)
    metrics: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_loaded_mb": rss_now_mb()}
    metrics["weight_mb"] = path.stat().st_size / 2**20  # the quantized tensors are nearly the whole file
    result: dict[str, Any] = {"metrics": metrics, "weight_path": "llama.cpp Q4_1 kernels"}
    log(f"llama.cpp loaded in {metrics['load_s']:.0f} s; running a")
    _generate(llm, w.decode_prompt, w.warmup_new_tokens)
    if "a" in phases:
        t = _generate(llm, w.decode_prompt, w.decode_new_tokens)
        metrics.update(single_metrics("a", t, w.decode_new_tokens))
        result["decode_ids"] = t.token_ids
    return result


def _generate(llm: Any, prompt: list[int], num_new: int) -> StreamTiming:
    start = time.perf_counter()
    first = last = start
    ids: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        last = time.perf_counter()
        first = last if not ids else first
        ids.append(int(token))
        if len(ids) == num_new:
            break
    return StreamTiming(start, first, last, time.perf_counter(), ids)
